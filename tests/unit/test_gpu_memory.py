"""GPU memory budget arithmetic with made-up free / total figures (no GPU needed)."""

from __future__ import annotations

import pytest

from redheart.config import HybridConfig
from redheart.gpu_memory import ESTIMATE_PARTS, GiB, allocator_fraction, check_device_budget, stage_estimates
from redheart.model import CUDA_CONTEXT_BYTES, estimate_stage_memory_bytes, resolve_model_shape

CARD = "cuda:1 (NVIDIA GeForce RTX 2070 SUPER)"


def _fatal(findings):
    return [f for f in findings if not f.ok and f.fatal]


def test_a_fitting_estimate_on_a_free_card_passes():
    findings = check_device_budget(7 * GiB, 5 * GiB, free_bytes=7.5 * GiB, total_bytes=8 * GiB, device=CARD)
    assert not _fatal(findings) and all(f.ok for f in findings)


def test_estimate_above_the_budget_is_refused_with_numbers_and_fix():
    (bad,) = _fatal(check_device_budget(4 * GiB, 5.25 * GiB, free_bytes=None, total_bytes=None, device=CARD))
    assert "5.25 GiB vs gpu_memory_gb = 4" in bad.what
    assert "activation_checkpointing = true" in bad.fix and "at least 5.3" in bad.fix


def test_budget_above_the_card_is_refused_naming_the_card():
    (bad,) = _fatal(
        check_device_budget(24 * GiB, 5 * GiB, free_bytes=7.8 * GiB, total_bytes=8 * GiB, device=CARD)
    )
    assert "gpu_memory_gb = 24 vs cuda:1 (NVIDIA GeForce RTX 2070 SUPER): 8.00 GiB in total" == bad.what
    assert "gpu_memory_gb <= 8.0" in bad.fix


def test_estimate_above_the_free_memory_is_refused_and_says_who_holds_the_rest():
    findings = check_device_budget(8 * GiB, 5 * GiB, free_bytes=3 * GiB, total_bytes=8 * GiB, device=CARD)
    (bad,) = _fatal(findings)
    assert (
        "needs ~5.00 GiB; cuda:1 (NVIDIA GeForce RTX 2070 SUPER) has 3.00 GiB free (5.00 of 8.00 GiB held by other processes)"
        in bad.what
    )
    assert "nvidia-smi" in bad.fix


def test_budget_above_free_memory_is_only_a_warning_while_the_estimate_fits():
    findings = check_device_budget(8 * GiB, 2 * GiB, free_bytes=6 * GiB, total_bytes=8 * GiB, device=CARD)
    assert not _fatal(findings)
    (warn,) = [f for f in findings if not f.ok]
    assert not warn.fatal and "above the 6.00 GiB free" in warn.what


def test_allocator_fraction_takes_the_context_off_the_budget():
    assert allocator_fraction(8 * GiB, 80 * GiB, context_bytes=GiB) == pytest.approx(7 / 80)
    assert allocator_fraction(100 * GiB, 80 * GiB, context_bytes=GiB) == pytest.approx(
        79 / 80
    )  # capped at the card
    with pytest.raises(ValueError, match="cannot hold the CUDA context"):
        allocator_fraction(GiB // 4, 8 * GiB, context_bytes=CUDA_CONTEXT_BYTES)


def test_estimate_counts_checkpointing_autocast_cache_and_context():
    shape = resolve_model_shape(HybridConfig(model={"preset": "base"}).model)
    plain = estimate_stage_memory_bytes(shape, "gpu", 4, 2)
    ckpt = estimate_stage_memory_bytes(shape, "gpu", 4, 2, checkpointing=True)
    amp = estimate_stage_memory_bytes(shape, "gpu", 4, 2, activation_bytes=2, autocast=True, cuda=True)
    assert ckpt["activations"] < plain["activations"] / 4
    assert amp["autocast_cache"] == 2 * amp["parameters"] and amp["cuda_context"] == CUDA_CONTEXT_BYTES
    assert amp["total"] == sum(amp[k] for k in ESTIMATE_PARTS) and amp["cuda_workspace"] > 0


def test_the_fix_the_check_suggests_can_make_it_pass():
    # The old estimate ignored activation checkpointing: its own fix could never pass the check.
    cfg = HybridConfig(
        model={"preset": "base"}, train={"batch_size": 16, "micro_batch_size": 8}, gpu_memory_gb=3.0
    )
    shape = resolve_model_shape(cfg.model)
    budget = int(cfg.gpu_stage.gpu_memory_gb * GiB)
    need = stage_estimates(cfg, shape, gpu_on_cuda=True)["gpu"]["total"]
    assert _fatal(check_device_budget(budget, need, None, None, CARD))
    fixed = cfg.replace(**{"gpu_stage.activation_checkpointing": True})
    need = stage_estimates(fixed, shape, gpu_on_cuda=True)["gpu"]["total"]
    assert not _fatal(check_device_budget(budget, need, None, None, CARD))
