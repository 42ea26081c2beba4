"""Stop a run hard (SIGKILL the orchestrator and both stages), --resume it: the losses after the
resume and the final parameters equal those of a run that never stopped (fp32, CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, cli_env, run_cli
from safetensors.torch import load_file

from orchestrator import checkpoint as ckpt

pytestmark = pytest.mark.slow

RESUME_TOML = """
[model]
preset = "small"
dropout = 0.1
[train]
batch_size = 16
micro_batch_size = 4
max_steps = 30
log_every_n_steps = 1
learning_rate = 2e-3
warmup_steps = 3
[data]
path = "{data}"
max_scenarios = 600
[checkpoint]
save_checkpoint_every = 10
keep_last = 5
[orchestrator]
output_dir = "{out}"
progress = "log"
[metrics]
enabled = false
"""


def _config(tmp_path, corpus, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(RESUME_TOML.format(data=corpus, out=tmp_path / name))
    return path


def _losses(report):
    return {h["step"]: (h["loss"], h["losses"]) for h in report["loss_history"]}


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    d = ckpt.step_dir(run_dir / "checkpoints", step)
    return {
        **load_file(str(d / "cpu" / "weights.safetensors")),
        **load_file(str(d / "gpu" / "weights.safetensors")),
    }


def test_kill_everything_then_resume_matches_an_uninterrupted_run(tmp_path, corpus):
    straight_cfg = _config(tmp_path, corpus, "straight")
    result = run_cli(["orchestrator.cli", "--config", str(straight_cfg)])
    assert result.returncode == 0, result.stderr[-3000:]
    straight = json.loads((tmp_path / "straight" / "report.json").read_text())

    cfg = _config(tmp_path, corpus, "killed")
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "--config", str(cfg)],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    manifest = ckpt.step_dir(run_dir / "checkpoints", 10) / "manifest.json"
    deadline = time.monotonic() + 240
    while not manifest.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.01)
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in family:  # the orchestrator, both stages and the regret service: kill -9, no goodbyes
        try:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(10)
    proc.stderr.close()
    assert not (run_dir / "report.json").exists(), "the run finished before it could be killed"
    complete = [c.step for c in ckpt.list_complete(run_dir / "checkpoints")]
    assert complete and max(complete) < 30
    # A save interrupted mid-way: shard written, manifest missing. --resume must not take it.
    torn = ckpt.step_dir(run_dir / "checkpoints", 25)
    (torn / "cpu").mkdir(parents=True)
    (torn / "cpu" / "stage.json").write_text("{}")

    result = run_cli(["orchestrator.cli", "--config", str(cfg), "--resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at step {max(complete)} from" in result.stderr
    resumed = json.loads((run_dir / "report.json").read_text())
    assert resumed["steps"] == 30
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == sorted(a) == list(range(1, 31))
    for step in range(max(complete) + 1, 31):
        assert b[step] == a[step], f"step {step}: {b[step]} != {a[step]}"
    wa, wb = _weights(tmp_path / "straight", 30), _weights(run_dir, 30)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # orphans of the killed orchestrator shut themselves down
    time.sleep(3)
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in family[1:]
    )


def test_resume_without_checkpoint_and_incomplete_checkpoint_are_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    d = ckpt.step_dir(root, 4)
    (d / "cpu").mkdir(parents=True)
    (d / "gpu").mkdir()
    (d / "cpu" / "stage.json").write_text("{}")
    (d / "gpu" / "stage.json").write_text("{}")
    assert ckpt.latest(root) is None  # no manifest: does not exist
    ckpt.write_manifest(d, {"step": 4, "run_id": "r"})
    assert ckpt.latest(root).step == 4
    torn = ckpt.step_dir(root, 8)
    (torn / "cpu").mkdir(parents=True)
    assert ckpt.latest(root).step == 4
    with pytest.raises(ckpt.CheckpointError, match="no manifest.json"):
        ckpt.read_manifest(torn)
