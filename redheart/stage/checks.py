"""Checks of what a request carries, shared by the runtime and the shard reader: the StartRun
settings, a round plan's numbers, and the limits steps and learning rates must stay within. Each
refusal is a :class:`StageError` whose message names the offending field."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from redheart.stage.contracts import RoundPlan
from redheart.stage.errors import ErrorKind, StageError

MAX_STEP = 1 << 62
"""Steps are int64 on the wire: a run starting near 2**63 would apply a step and then fail to report
the next one (and every Describe after it)."""

MAX_LEARNING_RATE = 1e30
"""Above this AdamW's step size (lr / bias correction) no longer fits in float32 and the update fails
half-way through the parameters; no real schedule comes near it."""


def check_settings(settings: Mapping[str, Any]) -> None:
    """The parts of the StartRun settings a step uses later: refused now (INVALID_ARGUMENT) rather
    than failing inside every RunStep as an INTERNAL error."""
    for section in ("train", "regret"):
        value = settings.get(section, {})
        if not isinstance(value, Mapping):
            raise StageError(
                ErrorKind.INVALID,
                f"StartRun settings: {section!r} must be a JSON object, got {type(value).__name__}",
            )
    weights = settings.get("train", {}).get("loss_weights", {})
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and is_real(v) for k, v in weights.items()
    ):
        raise StageError(
            ErrorKind.INVALID,
            f"StartRun settings: train.loss_weights must map head names to finite numbers, got {weights!r:.200}",
        )
    every = settings.get("empty_cache_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise StageError(
            ErrorKind.INVALID, f"StartRun settings: empty_cache_every = {every!r:.50} must be an integer >= 0"
        )
    regret = settings.get("regret", {})
    if regret.get("enabled", True):
        from redheart.calculus import check_counts

        try:
            check_counts(regret.get("regrets_per_step", 7), regret.get("bentham_per_regret", 3))
        except ValueError as exc:
            raise StageError(ErrorKind.INVALID, f"StartRun settings: regret: {exc}") from None
        timeout = regret.get("timeout_seconds", 30.0)
        if not (is_real(timeout) and timeout > 0):
            raise StageError(
                ErrorKind.INVALID,
                f"StartRun settings: regret.timeout_seconds = {timeout!r:.50} must be a number > 0",
            )


def check_plan_numbers(plan: RoundPlan) -> None:
    """Refuse non-finite numbers: an infinite deadline would wait on the peer forever (holding the
    stage's lock), an infinite loss multiplier or scale would turn every gradient into inf/NaN."""
    for name in ("deadline_seconds", "loss_multiplier", "loss_scale"):
        value = getattr(plan, name)
        if not (math.isfinite(value) and value > 0):
            raise StageError(
                ErrorKind.INVALID, f"step {plan.step}: {name} = {value} must be a finite number > 0"
            )


def check_hidden(kind: str, tensor: torch.Tensor, hidden_size: int) -> None:
    """A pushed activation or gradient between stages: a float tensor [batch, seq, hidden]."""
    if tensor.ndim != 3 or tensor.shape[-1] != hidden_size or not tensor.is_floating_point():
        raise StageError(
            ErrorKind.INVALID,
            f"{kind} must be a float tensor [batch, seq, {hidden_size}], got {tensor.dtype} {list(tensor.shape)}",
        )


def is_real(value: Any) -> bool:
    """A finite int or float; bools are refused although Python counts them as ints."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short(path: Any, limit: int = 200) -> str:
    """A path or id quoted for a message, cut at ``limit`` characters: requests can carry huge ones."""
    text = str(path)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
