"""The GPU stage in this process, without gRPC: the device check's measurements and the CUDA tests.

The stage's real runtime and part (gpu_stage/logic.py) run rounds whose activations are put in its
mailbox directly, and whose gradients land in a :class:`CollectingLink`. What it measures is the
stage alone: forward / backward time, host syncs per micro-batch, peak memory against the
estimate, and the optimizer variants.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
import warnings
from typing import Any

import torch

from redheart import heads as head_registry
from redheart.config import HybridConfig
from redheart.gpu_memory import stage_estimates
from redheart.model import resolve_model_shape
from redheart.stage.contracts import ACTIVATION, MicroBatchInputs, RoundPlan
from redheart.stage.runtime import StageRuntime


class CollectingLink:
    """A PeerLink that keeps what the stage sends (the CPU stage's side of the wire)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int, str, torch.Tensor]] = []
        self._lock = threading.Lock()

    def send(
        self, direction: str, run_id: str, step: int, micro_batch: int, kind: str, tensor: torch.Tensor
    ) -> None:
        with self._lock:
            self.sent.append((direction, step, micro_batch, kind, tensor.detach().to("cpu", copy=True)))

    def flush(self, timeout: float) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {"serialize_seconds": 0.0, "send_seconds": 0.0, "bytes_sent": 0}


def synthetic_micro_batch(index: int, size: int, seq: int, generator: torch.Generator) -> MicroBatchInputs:
    """Inputs of the last stage as they arrive off the wire: host tensors, every label present."""
    tensors = {"attention_mask": torch.ones(size, seq, dtype=torch.long)}
    # Every registered head's labels, drawn in registry order (emotions 0/1, Bentham uniform,
    # judgment a class): for the built-in heads the same draws as ever from `generator`.
    for spec in head_registry.heads():
        for label in spec.labels:
            rows = (size, *label.shape)
            if label.is_mask:
                tensors[label.key] = torch.ones(size, dtype=torch.bool)
            elif label.classes is not None:
                tensors[label.key] = torch.randint(0, label.classes, rows, generator=generator)
            elif spec.kind == "multi-label":
                tensors[label.key] = torch.randint(0, 2, rows, generator=generator).to(label.dtype)
            else:
                tensors[label.key] = torch.rand(rows, generator=generator).to(label.dtype)
    return MicroBatchInputs(index=index, tensors=tensors, sample_ids=[f"s{index}-{i}" for i in range(size)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_round(
    runtime: StageRuntime, config: HybridConfig, shape, step: int, seq: int, scale: float, gen
):
    """The plan of one synthetic round, its activations already in the mailbox (as if pushed)."""
    t, m = config.train, config.micro_batches
    # Every other micro-batch a quarter narrower: batches padded to their longest text differ in width.
    widths = [max(1, seq - (i % 2) * (seq // 4)) for i in range(m)]
    mbs = [synthetic_micro_batch(step * m + i, t.micro_batch_size, widths[i], gen) for i in range(m)]
    for mb, width in zip(mbs, widths):
        act = torch.randn(t.micro_batch_size, width, shape.hidden_size, generator=gen)  # [B, T_i, H]
        runtime.mailbox.put(("inprocess", step, mb.index, ACTIVATION), act)
    return RoundPlan(
        "inprocess",
        step,
        0,
        1,
        t.schedule,
        mbs,
        loss_multiplier=1.0 / m,
        loss_scale=scale,
        deadline_seconds=120.0,
    )


def _run_round_counting_syncs(runtime: StageRuntime, plan: RoundPlan, link, measuring: bool):
    """(result, host syncs of the round): syncs are counted by CUDA's sync debug mode when measuring."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if measuring:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = runtime.run_round(plan, link)
        finally:
            if measuring:
                torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught) if measuring else 0


def run_stage(
    config: HybridConfig,
    *,
    steps: int = 3,
    seq: int | None = None,
    count_syncs: bool = False,
    warmup: int = 1,
) -> dict[str, Any]:
    """Train ``steps`` optimizer steps of the GPU stage alone on ``config.gpu_stage.device``.

    Returns median seconds per step, forward / backward host seconds per micro-batch, host syncs
    per micro-batch (CUDA with ``count_syncs``), the precision, the loss scale and peak memory
    against the estimate."""
    from gpu_stage.logic import GpuStagePart

    shape = resolve_model_shape(config.model)
    t = config.train
    seq = seq or shape.max_seq_len
    m = config.micro_batches
    part_device = config.gpu_stage.device
    runtime = StageRuntime(
        lambda: GpuStagePart(
            shape, device=part_device, checkpointing=config.gpu_stage.activation_checkpointing
        ),
        shape,
    )
    device = runtime.part.device
    regret = {**dataclasses.asdict(config.regret), "enabled": True}
    settings = {"train": dataclasses.asdict(t), "regret": regret}
    runtime.start_run("inprocess", settings, reinitialize=True, first_step=0, regret_address="inprocess")
    link = CollectingLink()
    gen = torch.Generator().manual_seed(0)
    scale = 2.0**16 if runtime.precision.loss_scaling else 1.0
    times, fwd, bwd, syncs, skipped, peak = [], [], [], [], 0, 0
    losses: list[float] = []
    for step in range(warmup + steps):
        plan = _synthetic_round(runtime, config, shape, step, seq, scale, gen)
        _sync(device)
        start = time.perf_counter()
        measuring = count_syncs and device.type == "cuda" and step >= warmup
        result, sync_count = _run_round_counting_syncs(runtime, plan, link, measuring)
        if measuring:
            syncs.append(sync_count / m)
        skip = bool(result.found_inf)
        peak = max(peak, result.peak_memory_bytes)  # the step's rounds plus the previous ApplyStep
        runtime.apply("inprocess", step, 1.0, t.learning_rate, skip, loss_scale=scale)
        _sync(device)
        if skip:
            skipped += 1
            scale = max(1.0, scale / 2)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            fwd.append(result.timings["forward"] / m)
            bwd.append(result.timings["backward"] / m)
            losses.extend(mb["total_loss"] for mb in result.micro_batches)
    est = stage_estimates(config, shape, gpu_on_cuda=device.type == "cuda")["gpu"]
    return {
        "device": str(device),
        "precision": runtime.precision.name,
        "precision_reason": runtime.precision.reason,
        "step_seconds": statistics.median(times),
        "forward_seconds_per_micro_batch": statistics.median(fwd),
        "backward_seconds_per_micro_batch": statistics.median(bwd),
        "host_syncs_per_micro_batch": max(syncs) if syncs else None,
        "skipped_steps": skipped,
        "final_loss_scale": scale,
        "losses": losses,
        "gradients_sent": len(link.sent),
        "gradient_dtype": str(link.sent[-1][4].dtype) if link.sent else None,
        "peak_memory_bytes": int(max(peak, runtime._apply_peak)),
        "estimate_bytes": est["total"] - est["cuda_context"],
        "estimate": est,
    }


def time_adamw_variants(config: HybridConfig, reps: int = 5) -> dict[str, float]:
    """Seconds of one AdamW step over the GPU stage's parameters: per-tensor, foreach, fused."""
    from gpu_stage.logic import resolve_device
    from redheart.model import GpuStageModule

    device = resolve_device(config.gpu_stage.device)
    module = GpuStageModule(resolve_model_shape(config.model)).to(device)
    params = [p for p in module.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    variants = {"per-tensor (foreach=False)": {"foreach": False}, "foreach": {"foreach": True}}
    if device.type == "cuda":
        variants["fused"] = {"fused": True}
    out = {}
    for name, kwargs in variants.items():
        opt = torch.optim.AdamW(params, lr=1e-4, **kwargs)
        opt.step()  # allocates the state
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            opt.step()
        _sync(device)
        out[name] = (time.perf_counter() - start) / reps
        del opt
    return out
