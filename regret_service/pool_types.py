"""What the regret worker pool (regret_service/logic.py) answers and raises, and how it cuts a batch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from redheart import calculus

SMALL_BATCH = 64
"""Minimum rows per chunk; a batch below 2 x this runs in one worker (see the module docstring)."""


class WorkerCrashed(RuntimeError):
    """A chunk could not be scored: its worker died twice, or the pool is shutting down."""


class PoolTimeout(TimeoutError):
    """The request's deadline passed before every chunk was scored."""


class PoolClosed(RuntimeError):
    """The pool was shut down."""


class PoolListener(Protocol):
    """What the pool reports as it runs (the metrics module implements it)."""

    def on_busy(self, worker: int, seconds: float) -> None: ...

    def on_restart(self, worker: int) -> None: ...

    def on_alive(self, count: int) -> None: ...


@dataclass
class PoolResult:
    """The pool's answer for one batch of B scenarios."""

    regret: np.ndarray
    """float32 [B]."""
    best_index: np.ndarray
    """int64 [B]: index into calculus.COUNTERFACTUALS."""
    detail: calculus.RegretResult | None
    """The full breakdown (only when explain=True was asked)."""
    regret_computations: int
    bentham_evaluations: int
    seconds: float
    """Wall time of the whole batch in the pool."""
    chunks: int
    """How many chunks the batch was cut into."""


@dataclass
class PoolStats:
    busy_seconds: list[float]
    restarts: list[int]
    alive: int
    pids: list[int]


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def plan_chunks(rows: int, parts: int, small_batch: int = SMALL_BATCH) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges: at most ``parts``, each at least ``small_batch`` rows."""
    if rows <= 0:
        return []
    n = max(1, min(parts, rows // max(1, small_batch)))
    bounds = [rows * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)]
