"""The GPU memory budget: the estimate of each stage, and its check against a real card.

Pure arithmetic on numbers passed in, so the pre-flight check (which reads the card through a probe
subprocess, never through a CUDA context of its own) and the GPU stage (which reads it with
``torch.cuda.mem_get_info`` in its own process) apply one rule, and tests exercise it on CPU with
made-up free / total figures.

The rule, each failure with its numbers and the fix:

* the stage's estimate must fit ``gpu_memory_gb`` (the budget the user gives);
* the budget must fit the card's total memory;
* the estimate must fit the card's free memory (other processes hold the rest);
* a budget above the free memory is only a warning while the estimate still fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from redheart.model import CUDA_CONTEXT_BYTES, ModelShape, estimate_stage_memory_bytes

GiB = 1024**3


@dataclass(frozen=True)
class BudgetFinding:
    ok: bool
    fatal: bool
    what: str
    fix: str = ""


def in_flight_micro_batches(config) -> dict[str, int]:
    """Micro-batches whose activations a stage holds at once: 1F1B keeps p - rank (+ the regret
    look-ahead on the last stage, + the warm-up forward it answers on the first); GPipe all of them."""
    if config.train.schedule == "gpipe":
        return {"cpu": config.micro_batches, "gpu": config.micro_batches}
    return {"cpu": 2 + config.regret.lookahead, "gpu": 1 + config.regret.lookahead}


def stage_estimates(config, shape: ModelShape, gpu_on_cuda: bool) -> dict[str, dict[str, int]]:
    """The memory estimate of both stages under this config (see estimate_stage_memory_bytes)."""
    t = config.train
    act_bytes = 2 if t.use_mixed_precision else 4
    flight = in_flight_micro_batches(config)
    checkpointing = {
        "cpu": config.cpu_stage.activation_checkpointing,
        "gpu": config.gpu_stage.activation_checkpointing,
    }
    return {
        s: estimate_stage_memory_bytes(
            shape,
            s,
            t.micro_batch_size,
            flight[s],
            activation_bytes=act_bytes,
            checkpointing=checkpointing[s],
            autocast=t.use_mixed_precision,
            cuda=(s == "gpu" and gpu_on_cuda),
        )
        for s in ("cpu", "gpu")
    }


# The parts of an estimate whose sum is its "total", in the order a person reads them.
ESTIMATE_PARTS = (
    "weights",
    "gradients",
    "optimizer",
    "activations",
    "autocast_cache",
    "cuda_workspace",
    "cuda_context",
)


def describe_estimate(est: dict[str, int]) -> str:
    parts = [f"{k} {est[k] / GiB:.2f}" for k in ESTIMATE_PARTS if est.get(k)]
    return f"{est['total'] / GiB:.2f} GiB ({', '.join(parts)})"


SPLIT_FIX = (
    "move layers to the CPU stage (lower model.gpu_layers_ratio), a smaller train.micro_batch_size, "
    "or gpu_stage.activation_checkpointing = true"
)


def check_device_budget(
    budget_bytes: int, estimate_bytes: int, free_bytes: int | None, total_bytes: int | None, device: str
) -> list[BudgetFinding]:
    """Compare the budget (gpu_memory_gb) and the stage's estimate with a card's free and total memory.

    ``free_bytes`` / ``total_bytes`` None: the card could not be read (remote stage); only the
    estimate is compared with the budget. All figures in bytes; ``device`` names the card in the
    messages, e.g. "cuda:1 (NVIDIA GeForce RTX 2070 SUPER)"."""
    gb = budget_bytes / GiB
    out = [
        BudgetFinding(
            estimate_bytes <= budget_bytes,
            True,
            f"GPU stage memory estimate {estimate_bytes / GiB:.2f} GiB vs gpu_memory_gb = {gb:g}",
            SPLIT_FIX + f", or raise gpu_stage.gpu_memory_gb to at least {_ceil_gb(estimate_bytes)} "
            f"if the card has it",
        )
    ]
    if total_bytes is None or free_bytes is None:
        return out
    out.append(
        BudgetFinding(
            budget_bytes <= total_bytes,
            True,
            f"gpu_memory_gb = {gb:g} vs {device}: {total_bytes / GiB:.2f} GiB in total",
            f"set gpu_stage.gpu_memory_gb <= {total_bytes / GiB:.1f} (the card's memory) or use a larger GPU",
        )
    )
    used = max(0, total_bytes - free_bytes)
    out.append(
        BudgetFinding(
            estimate_bytes <= free_bytes,
            True,
            f"GPU stage needs ~{estimate_bytes / GiB:.2f} GiB; {device} has {free_bytes / GiB:.2f} GiB free "
            f"({used / GiB:.2f} of {total_bytes / GiB:.2f} GiB held by other processes)",
            "stop what holds the card (nvidia-smi lists it), choose another gpu_stage.device, or "
            + SPLIT_FIX,
        )
    )
    if budget_bytes > free_bytes and estimate_bytes <= free_bytes:
        out.append(
            BudgetFinding(
                False,
                False,
                f"gpu_memory_gb = {gb:g} is above the {free_bytes / GiB:.2f} GiB free on {device}: "
                f"the budget cannot be reached",
                f"lower gpu_stage.gpu_memory_gb to {free_bytes / GiB:.1f} or free the card",
            )
        )
    return out


def allocator_fraction(budget_bytes: int, total_bytes: int, context_bytes: int = CUDA_CONTEXT_BYTES) -> float:
    """The argument of torch.cuda.set_per_process_memory_fraction that holds the stage to its budget.

    The caching allocator's cap excludes the CUDA context, which is part of the budget, so the
    context is taken off first. Raises ValueError when the budget cannot hold even the context."""
    if total_bytes <= 0:
        raise ValueError(f"the card reports {total_bytes} bytes of memory")
    room = min(budget_bytes, total_bytes) - context_bytes
    if room <= 0:
        raise ValueError(
            f"gpu_memory_gb = {budget_bytes / GiB:g} cannot hold the CUDA context "
            f"(~{context_bytes / GiB:.2f} GiB) (fix: raise gpu_stage.gpu_memory_gb)"
        )
    return room / total_bytes


def _ceil_gb(n: int) -> str:
    return f"{-(-n * 10 // GiB) / 10:.1f}"
