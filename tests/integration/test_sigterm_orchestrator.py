"""SIGTERM / SIGINT of real processes mid-work: the orchestrator.

(c) SIGTERM and SIGINT to ``python -m orchestrator.cli`` training locally: it finishes the current
    step, writes a final checkpoint at that step boundary (manifest + report.json agree), stops
    every child (none alive afterwards: the pids are collected with psutil before the signal),
    exits 0, and ``--resume`` continues from the saved step.

Every wait is bounded; a process still alive at the end of a test is killed by its own pid.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, cli_env
from sigterm_support import wait_exit

# ----------------------------------------------------------------------------- (c) the orchestrator


def _wait_for_step(log: Path, proc: subprocess.Popen, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        done = [int(m) for m in re.findall(r"step (\d+)/\d+ epoch", text)]
        if done and max(done) >= step:
            return
        assert proc.poll() is None, f"the run exited early:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s:\n{text[-3000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_orchestrator_checkpoints_stops_every_child_and_resumes(tmp_path, tiny_toml, signum):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "orchestrator.log"
    # No periodic checkpoint: the only one the run writes is the one the signal asks for.
    base = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        "--config",
        str(tiny_toml),
        "--set",
        "checkpoint.save_checkpoint_every=1000",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            base + ["--set", "train.max_steps=100000"],
            cwd=ROOT,
            env=cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    children: list[psutil.Process] = []
    try:
        _wait_for_step(log_path, proc, 3)
        children = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert all(m in names for m in ("cpu_stage.cli", "gpu_stage.cli", "regret_service.cli")), names
        proc.send_signal(signum)
        code, after = wait_exit(proc, 120)
        text = log_path.read_text(errors="replace")
        assert code == 0, f"exit code {code} after {after:.1f}s:\n{text[-3000:]}"
        assert f"received {signal.Signals(signum).name}" in text
        report = json.loads((run_dir / "report.json").read_text())
        step = report["steps"]
        assert report["stopped_early"] is True and 3 <= step < report["total_steps"]
        manifest = run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json"
        assert manifest.is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert json.loads(manifest.read_text())["step"] == step
        assert report["checkpoint"] == str(manifest.parent)
        assert (
            max(h["step"] for h in report["loss_history"]) == step
        )  # the step in flight was finished, not dropped
        deadline = time.monotonic() + 10
        alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        assert not alive, (
            f"children still alive after the orchestrator exited: {[(c.pid, c.cmdline()) for c in alive]}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for c in children:
            try:
                c.kill()
            except psutil.Error:
                pass

    # --resume: continues from the saved step (a shorter max_steps changes the LR schedule; only
    # where it starts and that it ends cleanly are checked here).
    resumed = subprocess.run(
        base + ["--resume", "--set", f"train.max_steps={step + 2}"],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resumed run \S+ at step {step} from ", resumed.stderr), resumed.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == step + 2 and report["stopped_early"] is False
    # The history before the signal comes back from the manifest; no step is lost or run twice.
    assert [h["step"] for h in report["loss_history"]] == list(range(1, step + 3))
