"""A regret worker process killed during a run is replaced; training continues and no step is lost."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT, cli_env

pytestmark = pytest.mark.slow


def _regret_workers(orchestrator: psutil.Process) -> list[psutil.Process]:
    for child in orchestrator.children():
        if "regret_service.cli" in " ".join(child.cmdline()):
            # the pool's workers run multiprocessing's spawn entry point
            return [
                w
                for w in child.children()
                if "multiprocessing" in " ".join(w.cmdline())
                and "resource_tracker" not in " ".join(w.cmdline())
            ]
    return []


def test_killing_a_worker_mid_run_loses_no_step(tmp_path, tiny_toml):
    config = tiny_toml.read_text().replace("max_steps = 4", "max_steps = 90")
    tiny_toml.write_text(config)
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--set",
            "checkpoint.save_checkpoint_every=20",
        ],
        cwd=ROOT,
        env=cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoints" / "step-00000020" / "manifest.json").exists():
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        workers = _regret_workers(parent)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        workers[0].send_signal(signal.SIGKILL)
        killed = workers[0].pid
        assert proc.wait(240) == 0, (tmp_path / "run.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 90
    assert [h["step"] for h in report["loss_history"]] == list(range(1, 91))  # every step, once
    assert report["regret"]["computations"] == 90 * 8 * 7
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE
    regret_log = (tmp_path / "run" / "logs" / "regret.log").read_text()
    assert "restart" in regret_log.lower() or "replac" in regret_log.lower(), regret_log[-2000:]
