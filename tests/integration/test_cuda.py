"""The GPU stage on CUDA (skipped on machines without an NVIDIA GPU): the precision it chose from the
card, the fp16 loss scale moving, peak memory within the budget it enforces, --verify on the same
device, and save / resume with the next loss equal."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

from orchestrator import checkpoint as ckpt
from redheart.gpu_memory import GiB

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def _expected_mixed_precision() -> str:
    return "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"


def _train(tiny_toml, out, *sets, steps=8):
    args = [
        "orchestrator.cli",
        "--config",
        str(tiny_toml),
        "--output-dir",
        str(out),
        "--set",
        'gpu_stage.device="cuda"',
        "--set",
        f"train.max_steps={steps}",
    ]
    for s in sets:
        args += ["--set", s]
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), result


def test_mixed_precision_follows_the_card_and_is_reported(tmp_path, tiny_toml):
    report, result = _train(tiny_toml, tmp_path / "auto", "train.use_mixed_precision=true")
    expected = _expected_mixed_precision()
    assert report["precision"]["gpu_stage"]["used"] == expected
    assert report["precision"]["cpu_stage"]["used"] == "bf16"  # the CPU stage stays on the CPU
    assert f"gpu_stage trains in {expected}" in result.stderr
    gpu = report["stages"]["gpu_stage"]
    assert gpu["device"].startswith("cuda:") and gpu["device_name"] and gpu["compute_capability"]
    assert all(h["loss"] == h["loss"] for h in report["loss_history"])
    if expected == "bf16":
        assert report["loss_scale"]["enabled"] is False  # bf16 needs no loss scale


def test_fp16_loss_scale_moves_and_peak_memory_stays_in_the_budget(tmp_path, tiny_toml):
    # 2**24 overflows fp16 at once: the first steps are skipped together and the scale halves.
    report, _ = _train(
        tiny_toml,
        tmp_path / "fp16",
        "train.use_mixed_precision=true",
        'train.mixed_precision_dtype="fp16"',
        "train.initial_loss_scale=16777216.0",
        "gpu_stage.gpu_memory_gb=2.0",
        steps=12,
    )
    assert report["precision"]["gpu_stage"]["used"] == "fp16"
    scales = [h["loss_scale"] for h in report["loss_history"]]
    assert scales[0] == 2.0**24 and min(scales) < scales[0], scales
    assert 0 < report["skipped_steps"] < 12  # it comes down to a scale that fits, then trains
    assert report["loss_scale"]["enabled"] is True
    budget = 2.0 * GiB
    assert report["stages"]["gpu_stage"]["memory_budget_bytes"] == budget  # the stage capped itself
    assert 0 < report["peak_gpu_memory_bytes"] <= budget


def test_a_budget_the_card_cannot_give_is_refused_with_numbers(tmp_path, tiny_toml):
    total = torch.cuda.mem_get_info(0)[1]
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--check",
            "--set",
            'gpu_stage.device="cuda:0"',
            "--set",
            f"gpu_stage.gpu_memory_gb={total / GiB * 2:.1f}",
        ]
    )
    assert result.returncode != 0
    assert "GiB in total" in result.stdout + result.stderr and "cuda:0" in result.stdout + result.stderr


def test_cuda_verify_on_the_same_device(tiny_toml):
    # The reference runs the GPU part on the same card with the same dropout seeds; TF32 is off,
    # so only kernel order differs: within verify.CUDA_VERIFY_RTOL / CUDA_VERIFY_ATOL (1e-4).
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--verify",
            "--set",
            'gpu_stage.device="cuda"',
            "--set",
            "model.dropout=0.1",
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "VERIFY OK" in result.stdout


def test_save_and_resume_on_cuda_gives_the_same_next_loss(tmp_path, tiny_toml):
    straight, _ = _train(tiny_toml, tmp_path / "straight", steps=4)
    manifest = ckpt.step_dir(tmp_path / "straight" / "checkpoints", 2)
    assert (manifest / "manifest.json").exists()
    # Resume the straight run's step-2 checkpoint into another directory and train the same 2 steps.
    result = run_cli(
        [
            "orchestrator.cli",
            "--config",
            str(tiny_toml),
            "--output-dir",
            str(tmp_path / "from2"),
            "--set",
            'gpu_stage.device="cuda"',
            "--set",
            "train.max_steps=4",
            "--resume",
            str(manifest),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "from2" / "report.json").read_text())
    a = {h["step"]: h["loss"] for h in straight["loss_history"]}
    b = {h["step"]: h["loss"] for h in again["loss_history"]}
    # The step right after the resume: restored weights, optimizer, RNG and data position on the
    # card give the same forward, hence the same loss.
    assert b[3] == pytest.approx(a[3], rel=1e-6, abs=1e-7), (a, b)
    assert b[4] == pytest.approx(a[4], rel=1e-4), (a, b)
