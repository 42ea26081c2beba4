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
from conftest import ROOT, cli_env, run_cli, start_service
from safetensors.torch import load_file

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
    return {
        **load_file(str(d / "cpu" / "weights.safetensors")),
        **load_file(str(d / "gpu" / "weights.safetensors")),
    }


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "--config", str(faulty)],
        cwd=ROOT,
        env=cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
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
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
    straight_losses = {
        h["step"]: h["loss"]
        for h in json.loads((tmp_path / "straight" / "report.json").read_text())["loss_history"]
    }
    faulty_losses = {h["step"]: h["loss"] for h in report["loss_history"]}
    assert faulty_losses == straight_losses  # no step lost, none applied twice


REMOTE_TOML = """
[model]
preset = "tiny"
[train]
batch_size = 8
micro_batch_size = 2
learning_rate = 1e-3
max_steps = 10
log_every_n_steps = 1
[data]
path = "{data}"
max_scenarios = 200
[regret]
address = "inprocess"
[checkpoint]
save_checkpoint_every = 1
[launch]
mode = "remote"
[cpu_stage]
address = "127.0.0.1:{cpu}"
[gpu_stage]
address = "127.0.0.1:{gpu}"
[orchestrator]
output_dir = "{out}"
progress = "log"
[metrics]
enabled = false
"""


def _service(module, config, service, plan):
    """A stage started by hand that takes part in the fault plan as ``service``."""
    return start_service(
        module, config, env=dict(cli_env(), REDHEART_SERVICE=service, REDHEART_TEST_FAULTS=str(plan))
    )


def test_remote_orchestrator_killed_mid_step_a_new_one_trains_on_the_same_stages_within_30s(tmp_path, corpus):
    """The orchestrator dies after the CPU stage got step 5's plan and before the GPU stage did: the
    CPU stage sits in a round that cannot finish (step_deadline_seconds is 600 s). A new
    orchestrator resuming the run takes the stages over and trains at once."""
    from redheart import fault_injection

    plan = tmp_path / "faults.json"
    plan.write_text(
        json.dumps(
            {
                "faults": [
                    {"service": "cpu_stage", "phase": "RunStep", "step": 5, "action": "mark"},
                    {
                        "service": "orchestrator",
                        "phase": "RunStep gpu stage",
                        "step": 5,
                        "delay_seconds": 2.0,
                    },
                ]
            }
        )
    )
    service_config = tmp_path / "service.toml"
    service_config.write_text(REMOTE_TOML.format(data=corpus, out=tmp_path / "unused", cpu=0, gpu=0))
    cpu, cpu_port = _service("cpu_stage.cli", service_config, "cpu_stage", plan)
    gpu, gpu_port = _service("gpu_stage.cli", service_config, "gpu_stage", plan)
    run_dir = tmp_path / "run"
    config = tmp_path / "remote.toml"
    config.write_text(REMOTE_TOML.format(data=corpus, out=run_dir, cpu=cpu_port, gpu=gpu_port))
    env = dict(cli_env(), REDHEART_SERVICE="orchestrator", REDHEART_TEST_FAULTS=str(plan))
    second = None
    try:
        first = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "--config", str(config)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        killed_at = time.monotonic()
        assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
        assert sorted(fault_injection.fired(plan)) == [
            0,
            1,
        ]  # the CPU stage got the plan, then the orchestrator died
        assert ckpt.latest(run_dir / "checkpoints").step == 5

        second = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "--config", str(config), "--resume"],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        while ckpt.latest(run_dir / "checkpoints").step == 5:
            assert second.poll() is None, second.stderr.read()[-3000:]
            assert time.monotonic() - killed_at < 120, (
                "no step trained 120 s after the orchestrator was killed"
            )
            time.sleep(0.05)
        trained_after = time.monotonic() - killed_at
        _out, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-3000:]
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait(30)
        for p in (cpu, gpu):
            p.terminate()
            p.wait(30)
    print(f"a new orchestrator saved step 6 {trained_after:.1f}s after the old one was killed mid-step 5")
    assert trained_after < 30, trained_after
    report = json.loads((run_dir / "report.json").read_text())
    assert report["steps"] == 10
