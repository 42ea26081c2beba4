"""Scale-out as real processes. Three stages (model.stage_layers = [1, 1, 2]: the CPU stage, one
middle GPU stage process, the last with the heads): --verify against one process, a run whose
middle stage is killed mid-step ends with the weights of an uninterrupted run, and its checkpoint
exports to a model folder that predicts. Two data-parallel replicas (gloo): --verify, also of three
stages, and a run whose second replica's GPU stage is killed mid-step ends with the weights of an
uninterrupted run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_TOML, cli_env, run_cli, start_service
from safetensors.torch import load_file

from orchestrator import checkpoint as ckpt

pytestmark = pytest.mark.slow

THREE = ["--set", "model.stage_layers=[1, 1, 2]"]
TWO_REPLICAS = ["--set", "parallel.data_parallel=2"]
SHARDS = ("cpu", "gpu1", "gpu")


def _config(tmp_path, corpus, name: str, extra: str = "") -> tuple:
    path = tmp_path / f"{name}.toml"
    out = tmp_path / name
    text = TINY_TOML.format(data=corpus, out=out).replace("max_steps = 4", "max_steps = 6")
    path.write_text(text + extra)
    return path, out


def _final_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    d = ckpt.step_dir(run_dir / "checkpoints", step)
    weights: dict[str, torch.Tensor] = {}
    for shard in SHARDS:
        part = load_file(str(d / shard / "weights.safetensors"))
        assert not set(part) & set(weights), f"{shard} repeats parameters of another shard"
        weights.update(part)
    return weights


def test_three_stages_verify_with_accumulation(tmp_path, corpus):
    config, _ = _config(tmp_path, corpus, "verify")
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(config),
            *THREE,
            "--set",
            "train.gradient_accumulation_steps=2",
            "--verify",
        ]
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "VERIFY OK" in result.stdout
    assert result.stdout.count(" + 127.0.0.1:") == 2, "three stage addresses in the pipeline line"


def _straight_and_killed(tmp_path, corpus, args: list[str], victim: str) -> tuple:
    """The same run twice: uninterrupted, and with ``victim`` SIGKILLed at step 3's RunStep.
    Returns (the uninterrupted run's directory, the killed run's directory, its report)."""
    straight, straight_dir = _config(tmp_path, corpus, "straight")
    result = run_cli(["orchestrator.cli", "--config", str(straight), *args])
    assert result.returncode == 0, result.stderr[-3000:]

    plan = tmp_path / "faults.json"
    plan.write_text(json.dumps({"faults": [{"service": victim, "phase": "RunStep", "step": 3}]}))
    faulty, faulty_dir = _config(tmp_path, corpus, "faulty", "[launch]\nmax_restarts = 3\n")
    env = dict(cli_env(), REDHEART_TEST_FAULTS=str(plan))
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--config", str(faulty), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (plan.parent / "faults.json.fired" / "0.json").exists(), f"{victim} was never killed"
    report = json.loads((faulty_dir / "report.json").read_text())
    assert report["steps"] == 6
    return straight_dir, faulty_dir, report


def test_middle_stage_killed_mid_step_the_run_matches_and_exports(tmp_path, corpus):
    straight_dir, faulty_dir, report = _straight_and_killed(tmp_path, corpus, THREE, "gpu_stage_1")
    assert report["restarts"] == {"cpu_stage": 0, "gpu_stage_1": 1, "gpu_stage": 0, "regret": 0}
    a, b = _final_weights(straight_dir, 6), _final_weights(faulty_dir, 6)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")

    # The exported folder holds exactly the three shards' parameters, and the model it loads predicts.
    from inference import RedHeartModel, export_checkpoint

    folder = export_checkpoint(ckpt.step_dir(faulty_dir / "checkpoints", 6), tmp_path / "model")
    exported = load_file(str(folder / "model.safetensors"))
    assert exported.keys() == b.keys()
    for name in b:
        assert torch.equal(exported[name], b[name]), name
    model = RedHeartModel.from_pretrained(folder, device="cpu")
    [prediction] = model.predict(["A neighbour asks to borrow money she may not return."])
    assert sum(prediction.judgment_probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_two_replicas_verify_also_of_three_stages(tmp_path, corpus):
    config, _ = _config(tmp_path, corpus, "replicas")
    for extra in ([], THREE):
        result = run_cli(["orchestrator.cli", "--config", str(config), *TWO_REPLICAS, *extra, "--verify"])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "VERIFY OK" in result.stdout
        assert "2 replicas: every parameter equals replica 0's bit for bit" in result.stdout


def test_second_replica_killed_mid_step_the_run_matches(tmp_path, corpus):
    straight_dir, faulty_dir, report = _straight_and_killed(tmp_path, corpus, TWO_REPLICAS, "gpu_stage_r1")
    assert report["restarts"]["gpu_stage_r1"] == 1, report["restarts"]
    assert len(report["recoveries"]) == 1, report["recoveries"]  # the survivors left the sum at once
    d_straight = ckpt.step_dir(straight_dir / "checkpoints", 6)
    d_faulty = ckpt.step_dir(faulty_dir / "checkpoints", 6)
    for shard in ("cpu", "gpu"):
        a = load_file(str(d_straight / shard / "weights.safetensors"))
        b = load_file(str(d_faulty / shard / "weights.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            # The replicas sum their gradients in another order than one process: not the same bits.
            torch.testing.assert_close(
                b[name], a[name], rtol=1e-5, atol=4e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_two_remote_replicas_verify(tmp_path, corpus):
    """Replicas started by hand (remote mode): the orchestrator finds each replica's stages in
    cpu_stage.addresses / gpu_stage.addresses and hosts the rendezvous store they meet at."""
    inprocess = ("[regret]\nnum_workers = 2", '[regret]\naddress = "inprocess"')
    services_config, _ = _config(tmp_path, corpus, "services")
    services_config.write_text(services_config.read_text().replace(*inprocess))
    procs = []
    try:
        ports = {}
        for replica in range(2):
            for module in ("cpu_stage", "gpu_stage"):
                proc, ports[module, replica] = start_service(f"{module}.cli", services_config)
                procs.append(proc)
        cpu, gpu = (
            ", ".join(f'"127.0.0.1:{ports[m, r]}"' for r in range(2)) for m in ("cpu_stage", "gpu_stage")
        )
        remote = (
            f'[launch]\nmode = "remote"\n[cpu_stage]\naddresses = [{cpu}]\n[gpu_stage]\naddresses = [{gpu}]\n'
        )
        config, _ = _config(tmp_path, corpus, "remote", remote)
        config.write_text(config.read_text().replace(*inprocess))
        result = run_cli(["orchestrator.cli", "--config", str(config), *TWO_REPLICAS, "--verify"])
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        assert "VERIFY OK" in result.stdout
        assert "2 replicas: every parameter equals replica 0's bit for bit" in result.stdout
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
