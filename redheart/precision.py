"""Which arithmetic a stage trains in, chosen from the config and the device it runs on.

A pure function of (config, device type, compute capability), so the choice is unit-tested on a
machine without a GPU by passing a capability in:

* mixed precision off: fp32; on CUDA with TF32 tensor cores (compute capability >= 8.0) matmuls
  and convolutions use TF32 unless ``train.allow_tf32 = false``;
* mixed precision on, CUDA: bf16 autocast where the card has it natively (compute capability
  >= 8.0: Ampere, Ada, Hopper), else fp16 autocast with dynamic loss scaling. Turing (7.5) passes
  ``torch.cuda.is_bf16_supported()`` through emulation, which is several times slower than fp16,
  so the capability decides, never that call;
* mixed precision on, CPU: bf16 autocast (CPUs have no fast fp16 path; bf16 needs no loss scale).
  Fast only where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
  emulates it and the reason carries a warning (on an AVX2-only EPYC a 96x1024 @ 1024x4096
  matmul took 132 ms in bf16 against 20 ms in fp32, one thread).

Only fp16 needs loss scaling: its 5 exponent bits underflow small gradients, bf16 has fp32's range.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from redheart.weight_copies import linear_weight_copies

DTYPES = ("auto", "bf16", "fp16")
"""Values of ``train.mixed_precision_dtype``."""

NATIVE_BF16_CAPABILITY = (8, 0)
"""First compute capability with bf16 (and TF32) tensor cores: Ampere."""


CPU_BF16_WARNING = (
    "this CPU has no bf16 instructions (neither AVX512-BF16 nor AMX): bf16 matmuls are emulated, "
    "several times slower than fp32 (train.use_mixed_precision = false is faster here)"
)
"""Appended to the reason of bf16 on such a CPU; stages and the orchestrator log it as a warning."""


class PrecisionError(ValueError):
    """The configured precision cannot run on this device; the message names the fix."""


@dataclass(frozen=True)
class Precision:
    name: str
    """What the stage computes in: "fp32", "tf32", "bf16" or "fp16" (reported in report.json)."""
    autocast_dtype: torch.dtype | None
    """The autocast dtype, None when autocast is off."""
    loss_scaling: bool
    """True for fp16 only: the orchestrator runs a dynamic loss scale and skips overflowing steps."""
    tf32: bool
    """Whether fp32 matmuls may use TF32 tensor cores (CUDA only)."""
    reason: str
    """One line for the log: why this precision."""
    warning: str = ""
    """Non-empty when the choice runs but slowly here (bf16 on a CPU without bf16 hardware)."""


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    # Private probes of torch.cpu; a torch without them is assumed to have the hardware (no warning).
    found = [getattr(torch.cpu, name, None) for name in probes]
    if any(probe is None for probe in found):
        return True
    return any(probe() for probe in found)


def choose_precision(
    mixed: bool,
    dtype: str,
    allow_tf32: bool,
    device_type: str,
    capability: tuple[int, int] | None = None,
    *,
    cpu_bf16: bool | None = None,
) -> Precision:
    """The precision of a stage on ``device_type`` ("cpu" or "cuda") with ``capability`` (major, minor).

    ``mixed`` is ``train.use_mixed_precision``, ``dtype`` is ``train.mixed_precision_dtype`` and
    ``allow_tf32`` is ``train.allow_tf32``; ``cpu_bf16`` whether the CPU has bf16 hardware (None:
    this machine's, :func:`cpu_native_bf16`). Raises :class:`PrecisionError` for bf16 requested on
    a card without native bf16, or for an unknown dtype / device type."""
    if dtype not in DTYPES:
        raise PrecisionError(f"train.mixed_precision_dtype = {dtype!r} is not one of {', '.join(DTYPES)}")
    if device_type == "cpu":
        if not mixed:
            return Precision("fp32", None, False, False, "mixed precision off")
        # Still bf16 without the hardware: the run computes what was asked, only slower, and says so.
        slow = not (cpu_native_bf16() if cpu_bf16 is None else cpu_bf16)
        warning = CPU_BF16_WARNING if slow else ""
        reason = "bf16 autocast on CPU (no fast fp16 on CPUs; mixed_precision_dtype applies to CUDA)"
        return Precision(
            "bf16", torch.bfloat16, False, False, reason + (f"; {warning}" if slow else ""), warning
        )
    if device_type != "cuda":
        raise PrecisionError(f"no precision rule for device type {device_type!r} (cpu or cuda)")
    if capability is None or len(capability) != 2:
        raise PrecisionError(f"CUDA device without a compute capability ({capability!r})")
    cc = f"{capability[0]}.{capability[1]}"
    native = tuple(capability) >= NATIVE_BF16_CAPABILITY
    if not mixed:
        tf32 = allow_tf32 and native
        why = (
            "TF32 tensor cores for fp32 matmuls"
            if tf32
            else "TF32 off (train.allow_tf32 = false)"
            if native
            else f"no TF32 below compute capability 8.0 (this card: {cc})"
        )
        return Precision("tf32" if tf32 else "fp32", None, False, tf32, f"mixed precision off; {why}")
    tf32 = allow_tf32 and native  # what autocast leaves in fp32 (e.g. the losses) may still use TF32
    if dtype == "bf16" and not native:
        raise PrecisionError(
            f'train.mixed_precision_dtype = "bf16" but this GPU has compute capability {cc}: bf16 is '
            f"native from 8.0 (Ampere) on and emulated, several times slower, below it "
            f'(fix: mixed_precision_dtype = "auto" or "fp16")'
        )
    if dtype == "bf16" or (dtype == "auto" and native):
        return Precision(
            "bf16", torch.bfloat16, False, tf32, f"bf16 autocast (native bf16 at compute capability {cc})"
        )
    why = "as configured" if dtype == "fp16" else f"no native bf16 at compute capability {cc}"
    return Precision("fp16", torch.float16, True, tf32, f"fp16 autocast with dynamic loss scaling ({why})")


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The compute capability of a CUDA device (None on CPU). Creates no tensors."""
    if device.type != "cuda":
        return None
    return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]


def apply_tf32(precision: Precision, device: torch.device) -> None:
    """Set torch's process-wide TF32 switches for a stage on ``device`` (one stage per process)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision.tf32
        torch.backends.cudnn.allow_tf32 = precision.tf32


def autocast(precision: Precision | None, device_type: str):
    """The autocast region a forward of a stage in ``precision`` runs in (off for fp32 or None)."""
    dtype = precision.autocast_dtype if precision is not None else None
    if dtype is None:
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=dtype)


@contextlib.contextmanager
def held_weight_casts(precision: Precision, device_type: str, module: torch.nn.Module | None = None):
    """A context that keeps 16-bit copies of the weights for all the forwards and backwards inside it.

    Each ``torch.autocast`` region casts every weight it uses and drops the copies when the
    outermost region exits. A stage runs one region per micro-batch, so the weights were cast once
    per micro-batch: for the `base` CPU stage (6 layers, bf16, 1 thread) 60 ms of every 120 ms
    forward. Two holds, for a round (the weights do not change until the optimizer steps after it):

    * ``module``'s Linear weights are swapped for 16-bit leaf copies whose gradients go straight
      into the fp32 ``.grad`` (redheart/weight_copies.py: one pass over the gradient per
      micro-batch instead of three);
    * an outer, disabled autocast region keeps autocast's cache for whatever else it casts
      (the cache lives until the nesting depth returns to 0).

    On CUDA (and fp16) the copies hold the same values and the gradients sum the same numbers, so
    results are unchanged, bit for bit. bf16 on the CPU defers the Linear weight gradients: each
    backward keeps its (input, output-gradient) rows and one matmul per flush turns them into the
    fp32 ``.grad`` (an upcasting add per micro-batch cost ~0.9 s of a 3.4 s `base` step), so the
    sum is rounded once per flush instead of once per micro-batch: within bf16 rounding of
    autocast, independent of the 1F1B order. Memory falls, since the micro-batches in flight share
    one copy instead of saving one each. Backward runs inside it with autocast off, as without it.
    fp32 (no autocast): nothing to hold."""
    dtype = precision.autocast_dtype
    if dtype is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        if module is not None:
            # Deferred weight gradients where the upcasting add is what costs: bf16 on the CPU.
            defer = device_type == "cpu" and dtype == torch.bfloat16
            stack.enter_context(linear_weight_copies(module, dtype, defer=defer))
        yield
