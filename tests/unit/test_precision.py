"""The precision a stage trains in, chosen from a device's compute capability (no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.pipeline import DynamicLossScale, NonFiniteError
from redheart.config import ConfigError, HybridConfig, load_config
from redheart.precision import CPU_BF16_WARNING, PrecisionError, choose_precision, cpu_native_bf16

TURING, VOLTA, AMPERE, ADA, HOPPER = (7, 5), (7, 0), (8, 0), (8, 9), (9, 0)


@pytest.mark.parametrize(
    "capability, name, dtype, scaling",
    [
        (TURING, "fp16", torch.float16, True),  # bf16 is only emulated on Turing: never chosen
        (VOLTA, "fp16", torch.float16, True),
        (AMPERE, "bf16", torch.bfloat16, False),
        (ADA, "bf16", torch.bfloat16, False),
        (HOPPER, "bf16", torch.bfloat16, False),
    ],
)
def test_auto_mixed_precision_follows_the_capability(capability, name, dtype, scaling):
    p = choose_precision(True, "auto", True, "cuda", capability)
    assert (p.name, p.autocast_dtype, p.loss_scaling) == (name, dtype, scaling)
    assert f"{capability[0]}.{capability[1]}" in p.reason


def test_bf16_requested_below_ampere_is_refused_with_the_fix():
    with pytest.raises(
        PrecisionError, match=r"compute capability 7\.5.*fix: mixed_precision_dtype = \"auto\" or \"fp16\""
    ):
        choose_precision(True, "bf16", True, "cuda", TURING)
    assert choose_precision(True, "bf16", True, "cuda", HOPPER).name == "bf16"


def test_fp16_can_be_forced_on_a_bf16_card():
    p = choose_precision(True, "fp16", True, "cuda", HOPPER)
    assert (p.name, p.loss_scaling, p.tf32) == ("fp16", True, True)


@pytest.mark.parametrize(
    "capability, allow, name, tf32",
    [
        (HOPPER, True, "tf32", True),
        (HOPPER, False, "fp32", False),
        (TURING, True, "fp32", False),  # no TF32 tensor cores before Ampere
    ],
)
def test_fp32_uses_tf32_where_the_card_has_it_unless_turned_off(capability, allow, name, tf32):
    p = choose_precision(False, "auto", allow, "cuda", capability)
    assert (p.name, p.autocast_dtype, p.loss_scaling, p.tf32) == (name, None, False, tf32)


def test_cpu_is_bf16_when_mixed_and_fp32_otherwise():
    assert choose_precision(True, "fp16", True, "cpu").name == "bf16"  # the dtype key is for CUDA
    assert choose_precision(True, "auto", True, "cpu").autocast_dtype is torch.bfloat16
    p = choose_precision(False, "auto", True, "cpu")
    assert (p.name, p.autocast_dtype, p.tf32) == ("fp32", None, False)


def test_bad_inputs_are_named():
    with pytest.raises(PrecisionError, match="mixed_precision_dtype = 'fp8'"):
        choose_precision(True, "fp8", True, "cuda", HOPPER)
    with pytest.raises(PrecisionError, match="compute capability"):
        choose_precision(True, "auto", True, "cuda", None)
    with pytest.raises(PrecisionError, match="'mps'"):
        choose_precision(True, "auto", True, "mps")


def test_config_keys_are_validated(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nmixed_precision_dtype = "bf32"\n')
    with pytest.raises(ConfigError, match="mixed_precision_dtype = 'bf32' is not one of auto, bf16, fp16"):
        load_config(path)
    path.write_text("[train]\nmax_consecutive_skips = -1\n")
    with pytest.raises(ConfigError, match="max_consecutive_skips = -1 must be >= 0"):
        load_config(path)
    cfg = HybridConfig(mixed_precision_dtype="fp16", allow_tf32=False)
    assert (cfg.train.mixed_precision_dtype, cfg.train.allow_tf32, cfg.train.max_consecutive_skips) == (
        "fp16",
        False,
        32,
    )


def test_consecutive_fp16_skips_stop_the_run_naming_step_and_scale():
    scaler = DynamicLossScale(True, init_scale=8.0, max_consecutive_skips=5)
    for step in range(4):
        scaler.update(True, step)
    assert scaler.scale == 1.0  # floored: 8 -> 4 -> 2 -> 1 -> 1
    with pytest.raises(
        NonFiniteError, match=r"step 4: 5 consecutive steps overflowed in fp16.*loss scale now 1"
    ):
        scaler.update(True, 4)


def test_a_good_step_resets_the_skip_count_and_the_count_is_checkpointed():
    scaler = DynamicLossScale(True, max_consecutive_skips=3)
    for step in range(10):
        scaler.update(True, step)
        scaler.update(True, step)
        scaler.update(False, step)  # never 3 in a row
    restored = DynamicLossScale(True, max_consecutive_skips=3)
    scaler.update(True, 10)
    scaler.update(True, 11)
    restored.load(scaler.state())
    with pytest.raises(NonFiniteError, match="step 12: 3 consecutive"):
        restored.update(True, 12)


def test_no_limit_and_disabled_scaler_never_stop():
    unlimited = DynamicLossScale(True, max_consecutive_skips=0)
    off = DynamicLossScale(False, max_consecutive_skips=1)
    for step in range(100):
        unlimited.update(True, step)
        off.update(True, step)
    assert unlimited.scale == 1.0 and off.scale == 1.0


def test_cpu_bf16_without_the_hardware_still_runs_and_warns():
    fast = choose_precision(True, "auto", True, "cpu", cpu_bf16=True)
    slow = choose_precision(True, "auto", True, "cpu", cpu_bf16=False)
    assert (fast.name, slow.name) == ("bf16", "bf16")
    assert slow.autocast_dtype is torch.bfloat16 and not slow.loss_scaling
    assert fast.warning == "" and CPU_BF16_WARNING not in fast.reason
    assert slow.warning == CPU_BF16_WARNING and slow.reason.endswith(CPU_BF16_WARNING)
    assert "AVX512-BF16" in slow.warning and "use_mixed_precision = false" in slow.warning
    # fp32 needs no bf16 hardware: no warning either way.
    assert choose_precision(False, "auto", True, "cpu", cpu_bf16=False).warning == ""


def test_cpu_native_bf16_reads_torch_cpu_probes():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_native_bf16() is expected
    default = choose_precision(True, "auto", True, "cpu")
    assert (default.warning == "") is expected
