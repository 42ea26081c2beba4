"""The GPU stage run in process (gpu_stage/inprocess.py): on CPU the harness itself; on CUDA the
host syncs per micro-batch, counted with torch.cuda.set_sync_debug_mode."""

from __future__ import annotations

import pytest

from gpu_stage.inprocess import run_stage
from redheart.config import HybridConfig


def _config(device: str, **train) -> HybridConfig:
    t = {"batch_size": 8, "micro_batch_size": 2, "use_mixed_precision": True}
    t.update(train)
    return HybridConfig(model={"preset": "tiny"}, gpu_stage={"device": device}, train=t)


def test_the_stage_trains_alone_in_process_on_cpu():
    r = run_stage(_config("cpu"), steps=2, seq=16, count_syncs=True)
    assert r["precision"] == "bf16" and r["device"] == "cpu"
    assert r["gradients_sent"] == 3 * 4  # warm-up + 2 steps, 4 micro-batches each
    assert r["gradient_dtype"] == "torch.bfloat16"  # mixed precision: the compute dtype on the wire
    assert all(isinstance(v, float) and v == v for v in r["losses"])  # read back once per round, as floats
    assert r["host_syncs_per_micro_batch"] is None  # counted on CUDA only
    assert r["peak_memory_bytes"] == 0 and r["estimate_bytes"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["auto", "fp16"])
def test_at_most_two_host_syncs_per_micro_batch_on_cuda(dtype):
    r = run_stage(_config("cuda", mixed_precision_dtype=dtype), steps=2, seq=64, count_syncs=True)
    # One in each forward (the regret service scores host values), two per round (the losses read
    # back together, the gradient norm), spread over the round's 4 micro-batches.
    assert r["host_syncs_per_micro_batch"] is not None and r["host_syncs_per_micro_batch"] <= 2, r
    assert r["gradients_sent"] == 3 * 4
    assert r["peak_memory_bytes"] > 0


@pytest.mark.cuda
def test_cuda_peak_memory_stays_under_the_estimate():
    cfg = _config("cuda")
    r = run_stage(cfg, steps=2, count_syncs=False)
    # Stated bound: the estimate (without the CUDA context, which the allocator does not see) is an
    # upper bound of max_memory_allocated over the whole step, ApplyStep included.
    assert 0 < r["peak_memory_bytes"] <= r["estimate_bytes"], r
