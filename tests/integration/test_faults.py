"""kill -9 of the CPU stage, the GPU stage and the regret service mid-run: the local run recovers
from the last checkpoint, finishes, reports the restarts, and ends with exactly the parameters of
an uninterrupted run (fp32, CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, cli_env, run_cli
from orchestrator import checkpoint as ckpt

pytestmark = pytest.mark.slow

FAULT_TOML = """
[model]
preset = "small"
[train]
batch_size = 16
micro_batch_size = 4
max_steps = 40
log_every_n_steps = 1
learning_rate = 2e-3
[data]
path = "{data}"
max_scenarios = 800
[regret]
num_workers = 2
[checkpoint]
save_checkpoint_every = 10
keep_last = 5
[launch]
max_restarts = 5
[orchestrator]
output_dir = "{out}"
progress = "log"
[metrics]
enabled = false
"""


def _weights(run_dir, step):
    d = ckpt.step_dir(run_dir / "checkpoints", step)
    return {**load_file(str(d / "cpu" / "weights.safetensors")), **load_file(str(d / "gpu" / "weights.safetensors"))}


def _child(proc, module):
    for child in psutil.Process(proc.pid).children():
        if module in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no child running {module}")


def test_each_service_killed_once_mid_run_and_the_run_still_matches(tmp_path, corpus):
    straight = tmp_path / "straight.toml"
    straight.write_text(FAULT_TOML.format(data=corpus, out=tmp_path / "straight"))
    result = run_cli(["orchestrator.cli", "--config", str(straight)])
    assert result.returncode == 0, result.stderr[-3000:]

    faulty = tmp_path / "faulty.toml"
    run_dir = tmp_path / "faulty"
    faulty.write_text(FAULT_TOML.format(data=corpus, out=run_dir))
    log = open(tmp_path / "faulty.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--config", str(faulty)], cwd=ROOT, env=cli_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    killed = []
    try:
        for step, module in ((10, "cpu_stage.cli"), (20, "gpu_stage.cli"), (30, "regret_service.cli")):
            manifest = ckpt.step_dir(run_dir / "checkpoints", step) / "manifest.json"
            deadline = time.monotonic() + 240
            while not manifest.exists():
                assert proc.poll() is None, (tmp_path / "faulty.log").read_text()[-3000:]
                assert time.monotonic() < deadline, f"no checkpoint at step {step}"
                time.sleep(0.01)
            victim = _child(proc, module)
            victim.send_signal(signal.SIGKILL)
            killed.append((module, victim.pid))
        assert proc.wait(300) == 0, (tmp_path / "faulty.log").read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 40
    assert report["restarts"] == {"cpu_stage": 1, "gpu_stage": 1, "regret": 1}, report["recoveries"]
    assert [r["restarted"] for r in report["recoveries"]] == [["cpu_stage"], ["gpu_stage"], ["regret"]]
    a, b = _weights(tmp_path / "straight", 40), _weights(run_dir, 40)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    straight_losses = {h["step"]: h["loss"] for h in json.loads((tmp_path / "straight" / "report.json").read_text())["loss_history"]}
    faulty_losses = {h["step"]: h["loss"] for h in report["loss_history"]}
    assert faulty_losses == straight_losses  # no step lost, none applied twice
