"""Two real stage processes on loopback train exactly like one process (fp32, CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from synthetic import synthetic_batch

from orchestrator.launcher import LocalLauncher
from orchestrator.pipeline import PipelineDriver
from orchestrator.reference import SingleProcessTrainer
from orchestrator.stage_client import StageClient, start_stages
from redheart.config import load_config


@pytest.fixture
def stage_processes(tmp_path, tiny_toml):
    cfg = load_config(
        tiny_toml,
        overrides=["train.gradient_accumulation_steps=2", 'regret.address="inprocess"', "model.dropout=0.1"],
        env={},
    )
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(cfg.to_toml())
    launcher = LocalLauncher(cfg, resolved, tmp_path / "logs")
    launcher.start(["cpu_stage", "gpu_stage"])
    clients = {
        n: StageClient(n.replace("_", " "), launcher.services[n].address, max_message_mb=64, rpc_timeout=30)
        for n in ("cpu_stage", "gpu_stage")
    }
    yield cfg, launcher, clients
    for c in clients.values():
        c.close()
    launcher.stop_all()
    for svc in launcher.services.values():
        assert svc.proc.returncode == 0, f"{svc.name} exited with {svc.proc.returncode} on SIGTERM"


@pytest.mark.parametrize("steps", [1, 3])
def test_pipelined_training_equals_single_process(stage_processes, steps):
    cfg, launcher, clients = stage_processes
    assert cfg.micro_batches == 4 and cfg.train.gradient_accumulation_steps == 2
    settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
    cpu, gpu = clients["cpu_stage"], clients["gpu_stage"]
    run = f"equivalence-{steps}"
    start_stages([cpu, gpu], run, settings, regret_address="inprocess")
    driver = PipelineDriver((cpu, gpu), cfg, run, dead_services=launcher.dead)
    reference = SingleProcessTrainer(cfg)
    try:
        for step in range(steps):
            rounds = [synthetic_batch(100 * step + r) for r in range(2)]
            got = driver.run_step(step, rounds, 2e-3)
            want = reference.step(step, rounds, 2e-3)
            torch.testing.assert_close(
                torch.tensor(got.micro_batch_losses),
                torch.tensor(want["micro_batch_losses"]),
                rtol=1e-5,
                atol=4e-5,
            )
            assert got.grad_norm == pytest.approx(want["grad_norm"], rel=1e-5)
            # Activations and gradients went directly between the stages, in both directions.
            assert (
                got.stage_timings["cpu stage"]["bytes_sent"] > 0
                and got.stage_timings["gpu stage"]["bytes_sent"] > 0
            )
    finally:
        driver.close()
    live = {**cpu.parameters(), **gpu.parameters()}
    ref = reference.named_parameters()
    assert set(live) == set(ref)
    for name, value in ref.items():
        torch.testing.assert_close(
            live[name], value, rtol=1e-5, atol=4e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
