"""The stage's inbox: tensors pushed by the peer stage wait here, keyed by (run, step, micro-batch,
kind), until the round that needs them takes them (or the step is aborted or cleared)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import torch

from redheart.stage.errors import ErrorKind, StageError, StepAborted


class Mailbox:
    """Tensors pushed by the peer, keyed by (run, step, micro-batch, kind); waiters block on a condition.

    Each tensor carries the attempt of the step it was sent for (0: not given). Once a RunStep of
    attempt N started here (:meth:`set_floor`), tensors of attempts below N are stale: dropped on
    arrival and when the floor rises, counted in ``stale_dropped`` (and ``on_stale``), so a
    tensor of an aborted try can never satisfy, or be mistaken for a duplicate of, the next one's."""

    MAX_FLOORS = 64

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: dict[tuple[str, int, int, str], tuple[int, torch.Tensor]] = {}
        self._consumed: dict[tuple[str, int, int, str], int] = {}  # key -> attempt it was taken for
        self._aborted: dict[tuple[str, int], str] = {}
        self._arrived: dict[tuple[str, int], float] = {}  # (run, step) -> when its last tensor arrived
        self._floor: dict[tuple[str, int], int] = {}  # (run, step) -> oldest attempt still accepted
        self.stale_dropped = 0
        self.on_stale: Callable[[int], None] | None = None

    def _stale(self, n: int) -> None:
        self.stale_dropped += n
        if self.on_stale is not None and n:
            self.on_stale(n)

    def put(self, key: tuple[str, int, int, str], tensor: torch.Tensor, attempt: int = 0) -> str:
        """Store; returns "fresh", "duplicate" (already delivered: drop it) or "stale" (dropped)."""
        with self._cond:
            if attempt != 0 and attempt < self._floor.get((key[0], key[1]), 0):
                self._stale(1)
                return "stale"
            held = self._items.get(key)
            if (held is not None and held[0] >= attempt) or self._consumed.get(key, -1) >= attempt:
                return "duplicate"
            self._items[key] = (attempt, tensor)
            self._arrived[(key[0], key[1])] = time.monotonic()
            self._cond.notify_all()
            return "fresh"

    def set_floor(self, run_id: str, step: int, attempt: int) -> None:
        """A RunStep of ``attempt`` started: tensors of older attempts of the step are stale."""
        with self._cond:
            if attempt <= self._floor.get((run_id, step), 0):
                return
            self._floor[(run_id, step)] = attempt
            while len(self._floor) > self.MAX_FLOORS:
                del self._floor[next(iter(self._floor))]
            old = [
                k for k, (a, _t) in self._items.items() if k[0] == run_id and k[1] == step and 0 < a < attempt
            ]
            for key in old:
                del self._items[key]
            self._consumed = {
                k: a
                for k, a in self._consumed.items()
                if not (k[0] == run_id and k[1] == step and a < attempt)
            }
            self._stale(len(old))

    def count(self, run_id: str, step: int, kinds: Sequence[str]) -> int:
        """Tensors of (run, step) of these kinds held and not yet taken."""
        with self._cond:
            return sum(1 for k in self._items if k[0] == run_id and k[1] == step and k[3] in kinds)

    def drop(self, keep) -> None:
        """Forget the held tensors whose key ``keep(key)`` refuses (older steps, other passes)."""
        with self._cond:
            for key in [k for k in self._items if not keep(k)]:
                del self._items[key]

    def get(
        self, key: tuple[str, int, int, str], timeout: float, describe: str, attempt: int = 0
    ) -> torch.Tensor:
        """Wait for ``key`` (of ``attempt``; a tensor of a newer attempt is left for it). The
        deadline measures progress: it fails when nothing of this step arrived for ``timeout``
        seconds, so a long round whose tensors keep coming never does."""
        started = time.monotonic()
        with self._cond:
            while True:
                held = self._items.get(key)
                if held is not None and (attempt == 0 or held[0] in (0, attempt)):
                    break
                reason = self._aborted.get((key[0], key[1]))
                if reason is not None:
                    raise StepAborted(f"step {key[1]} was aborted while waiting for {describe}: {reason}")
                since = max(started, self._arrived.get((key[0], key[1]), 0.0))
                remaining = since + timeout - time.monotonic()
                if remaining <= 0:
                    raise StageError(
                        ErrorKind.DEADLINE,
                        f"nothing arrived for {timeout:.1f}s while waiting for {describe} "
                        f"(step {key[1]}, micro-batch {key[2]}); is the peer stage alive?",
                    )
                self._cond.wait(min(remaining, 1.0))
            self._consumed[key] = held[0]
            del self._items[key]
            return held[1]

    MAX_ABORTED = 256
    """Abort marks kept (a step's mark is dropped when the step is cleared); the oldest go first,
    so AbortStep calls for steps that never run cannot grow the stage's memory without bound."""

    def abort(self, run_id: str, step: int, reason: str) -> None:
        with self._cond:
            self._aborted.pop((run_id, step), None)
            self._aborted[(run_id, step)] = reason
            while len(self._aborted) > self.MAX_ABORTED:
                del self._aborted[next(iter(self._aborted))]
            for key in [k for k in self._items if k[0] == run_id and k[1] == step]:
                del self._items[key]
            self._cond.notify_all()

    def aborted(self, run_id: str, step: int) -> str | None:
        with self._cond:
            return self._aborted.get((run_id, step))

    def clear_step(self, run_id: str, step: int, kinds: Sequence[str] | None = None) -> None:
        """Forget everything of a finished step (keeps memory bounded over a long run). Its attempt
        floor stays: tensors of an aborted try may still arrive."""
        with self._cond:
            for key in [
                k for k in self._items if k[0] == run_id and k[1] == step and (kinds is None or k[3] in kinds)
            ]:
                del self._items[key]
            self._consumed = {
                k: a
                for k, a in self._consumed.items()
                if not (k[0] == run_id and k[1] == step and (kinds is None or k[3] in kinds))
            }
            self._aborted.pop((run_id, step), None)
            self._arrived.pop((run_id, step), None)

    def reset(self) -> None:
        with self._cond:
            self._items.clear()
            self._consumed.clear()
            self._aborted.clear()
            self._arrived.clear()
            self._floor.clear()
            self._cond.notify_all()
