"""GPU stage on CUDA with fp16 mixed precision (skipped on machines without an NVIDIA GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def test_fp16_run_with_the_gpu_stage_on_cuda(tmp_path, tiny_toml):
    result = run_cli(["orchestrator.cli", "--config", str(tiny_toml), "--set", 'gpu_stage.device="cuda"',
                      "--set", "train.use_mixed_precision=true", "--set", "train.max_steps=8"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["stages"]["gpu_stage"]["device"].startswith("cuda")
    losses = [h["loss"] for h in report["loss_history"]]
    assert all(l == l for l in losses)  # no NaN reached the report: overflowing steps are skipped together
    assert report["skipped_steps"] < 8


def test_cuda_verify_within_fp32_tolerance(tiny_toml):
    # fp32 on CUDA vs fp32 on CPU differ by kernel order only.
    result = run_cli(["orchestrator.cli", "--config", str(tiny_toml), "--verify", "--set", 'gpu_stage.device="cuda"',
                      "--set", "orchestrator.verify_atol=1e-3", "--set", "orchestrator.verify_rtol=1e-3"])
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert torch.cuda.is_available()
