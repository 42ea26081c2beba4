"""Pipeline schedules as one pure function.

``build_schedule`` returns, for every stage, the ordered list of actions it runs in one
accumulation round: ``F(i)`` = forward of micro-batch i, ``B(i)`` = backward of micro-batch i.

* **1F1B**: stage r runs ``p - 1 - r`` warm-up forwards, then alternates one forward and one
  backward (steady state), then drains the remaining backwards (cool-down). At most ``p - r``
  micro-batches hold activations on stage r at any time, independent of m.
* **GPipe**: all forwards, then all backwards; m micro-batches held at once.

``extra_warmup`` adds the same number of warm-up forwards on every stage. The last stage uses it
so the regret request of micro-batch i is in flight while micro-batch i+1 is computed (the
look-ahead); adding it on every stage keeps the schedule deadlock-free (each stage has produced
the activations its successor needs before it waits for a gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Action", "build_schedule", "peak_in_flight", "simulate"]


@dataclass(frozen=True)
class Action:
    op: Literal["F", "B"]
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.op}{self.micro_batch}"


def build_schedule(
    kind: str, num_stages: int, num_micro_batches: int, *, extra_warmup: int = 0
) -> list[list[Action]]:
    """Each stage's ordered actions for one round of ``num_micro_batches`` micro-batches."""
    if num_stages < 1:
        raise ValueError(f"num_stages = {num_stages} must be >= 1")
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches = {num_micro_batches} must be >= 1")
    if extra_warmup < 0:
        raise ValueError(f"extra_warmup = {extra_warmup} must be >= 0")
    p, m = num_stages, num_micro_batches
    if kind == "gpipe":
        one = [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]
        return [list(one) for _ in range(p)]
    if kind != "1f1b":
        raise ValueError(f"unknown schedule {kind!r}; choose 1f1b or gpipe")
    out = []
    for rank in range(p):
        warmup = min(p - 1 - rank + extra_warmup, m)
        actions = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):  # steady state: one forward, one backward
            actions.append(Action("F", warmup + i))
            actions.append(Action("B", i))
        actions += [Action("B", i) for i in range(m - warmup, m)]  # cool-down
        out.append(actions)
    return out


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose activations a stage holds at once (forwarded, not yet backwarded)."""
    live = peak = 0
    for action in actions:
        live += 1 if action.op == "F" else -1
        peak = max(peak, live)
    return peak


def simulate(schedules: list[list[Action]]) -> list[tuple[int, Action]]:
    """Run the stages' action lists against each other's data dependencies.

    F(i) on stage r needs F(i) done on stage r-1; B(i) on stage r needs B(i) done on stage r+1
    (the last stage's B(i) needs only its own F(i)). Returns the global order in which actions
    can complete; raises RuntimeError on a deadlock (no stage can make progress).
    """
    p = len(schedules)
    pos = [0] * p
    done: set[tuple[int, str, int]] = set()
    order: list[tuple[int, Action]] = []
    total = sum(len(s) for s in schedules)
    while len(order) < total:
        progressed = False
        for rank in range(p):
            if pos[rank] >= len(schedules[rank]):
                continue
            a = schedules[rank][pos[rank]]
            if a.op == "F":
                ready = rank == 0 or (rank - 1, "F", a.micro_batch) in done
            else:
                ready = (rank, "F", a.micro_batch) in done and (
                    rank == p - 1 or (rank + 1, "B", a.micro_batch) in done
                )
            if ready:
                done.add((rank, a.op, a.micro_batch))
                order.append((rank, a))
                pos[rank] += 1
                progressed = True
        if not progressed:
            waiting = {r: str(schedules[r][pos[r]]) for r in range(p) if pos[r] < len(schedules[r])}
            raise RuntimeError(f"schedule deadlocks; stages waiting at {waiting}")
    return order
