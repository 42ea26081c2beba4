"""The pipeline timeline: ``--trace STEPS`` writes ``<output_dir>/trace.json`` (Chrome trace events).

Open it in https://ui.perfetto.dev (drag the file in) or chrome://tracing: one process per service
(orchestrator, cpu stage, gpu stage) and one track per thread — the stage's compute thread
(forward, backward, waits on the peer, waits on the regret service), its sender thread (each
activation / gradient push), its regret client (each regret request from the forward that sent
it to the backward that used it) and the optimizer step; on the orchestrator, the step, each
RunStep / ApplyStep call on its calling thread, evaluation and checkpoints.

One clock: the stages report spans relative to the round's start plus the wall clock at that start
(StepResult.started_unix). Each stage's offset from the orchestrator's clock is measured when the
run starts, NTP-style, from Describe calls that return the stage's wall clock:
``offset = t_stage - (t_send + t_recv) / 2``, keeping the sample with the shortest round trip
(its error is at most half that round trip, reported in the file's ``otherData``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ORCHESTRATOR = "orchestrator"
NAMES = {"F": "forward", "B": "backward"}
CLOCK_SAMPLES = 7
# Threads whose spans overlap without nesting (several regret requests in flight): written as async
# begin/end pairs, which trace viewers draw on their own rows, instead of complete ("X") events.
ASYNC_THREADS = frozenset({"regret-client"})


def parse_steps(text: str) -> tuple[int, int]:
    """``"10-12"`` -> (10, 12); ``"5"`` -> (5, 5). Steps count from 1, as in the logs."""
    first, sep, last = str(text).strip().partition("-")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise ValueError(f"{text!r} is not a step range (expected N or FIRST-LAST, e.g. 10-12)") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"{text!r}: steps count from 1 and FIRST <= LAST (e.g. 10-12)")
    return lo, hi


def measure_offset(sample) -> tuple[float, float]:
    """(offset, round trip) of a remote clock; ``sample()`` returns (t_send, t_remote, t_recv)."""
    best = None
    for _ in range(CLOCK_SAMPLES):
        t_send, t_remote, t_recv = sample()
        rtt = t_recv - t_send
        if best is None or rtt < best[1]:
            best = (t_remote - (t_send + t_recv) / 2.0, rtt)
    assert best is not None
    return best


class TraceRecorder:
    """Collects the spans of the traced steps; thread-safe (stage calls run on a thread pool)."""

    def __init__(self, steps: tuple[int, int]) -> None:
        self.first, self.last = steps  # 1-based, as the user wrote them
        self.offsets: dict[str, float] = {ORCHESTRATOR: 0.0}
        self.round_trips: dict[str, float] = {}
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def active(self, step: int) -> bool:
        """`step`: the driver's 0-based step (logged as step + 1)."""
        return self.first <= step + 1 <= self.last

    def finished(self, step: int) -> bool:
        return step + 1 >= self.last

    def measure_clocks(self, clients: dict[str, Any]) -> None:
        for name, client in clients.items():
            offset, rtt = measure_offset(client.clock_sample)
            self.offsets[client.name] = offset
            self.round_trips[client.name] = rtt
            log.info("trace: %s clock offset %+.3f ms (round trip %.3f ms)", name, offset * 1e3, rtt * 1e3)

    # ---- recording

    def _add(
        self, process: str, thread: str, name: str, start: float, end: float, step: int, **args: Any
    ) -> None:
        """start / end: wall-clock seconds on `process`'s clock."""
        offset = self.offsets.get(process, 0.0)
        event = {
            "name": name,
            "process": process,
            "thread": thread,
            "start": start - offset,
            "end": max(end, start) - offset,
            "args": dict(args, step=step + 1),
        }
        with self._lock:
            self._events.append(event)

    @contextlib.contextmanager
    def span(self, name: str, step: int, **args: Any) -> Iterator[None]:
        """An orchestrator span on the calling thread (nothing when the step is not traced)."""
        if not self.active(step):
            yield
            return
        start = time.time()
        try:
            yield
        finally:
            self._add(ORCHESTRATOR, threading.current_thread().name, name, start, time.time(), step, **args)

    def stage_round(self, stage: str, request, result, t_call: float, t_done: float) -> None:
        """One RunStep: the orchestrator's call and every span the stage reported."""
        step = request.envelope.step
        if request.forward_only or not self.active(step):
            return
        rnd = request.accumulation_round
        self._add(
            ORCHESTRATOR,
            threading.current_thread().name,
            f"RunStep {stage}",
            t_call,
            t_done,
            step,
            accumulation_round=rnd,
        )
        base = result.started_unix
        if not base:  # a stage without the field: no spans can be placed on the clock
            return
        for s in result.spans:
            name = NAMES.get(s.action, s.action)
            self._add(
                stage,
                s.thread or "compute",
                f"{name} mb{s.micro_batch}",
                base + s.start,
                base + s.end,
                step,
                micro_batch=s.micro_batch,
                accumulation_round=rnd,
                action=s.action,
            )

    def stage_apply(self, stage: str, step: int, response, t_call: float, t_done: float) -> None:
        if not self.active(step):
            return
        self._add(ORCHESTRATOR, threading.current_thread().name, f"ApplyStep {stage}", t_call, t_done, step)
        if response.started_unix:
            name = "optimizer step" if response.applied else "optimizer step (skipped)"
            self._add(
                stage,
                "optimizer",
                name,
                response.started_unix,
                response.started_unix + response.seconds,
                step,
            )

    # ---- output

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    def chrome_trace(self) -> dict[str, Any]:
        """The Chrome trace-event JSON object: complete ("X") events in microseconds, plus names."""
        events = sorted(self.events(), key=lambda e: e["start"])
        t0 = events[0]["start"] if events else 0.0
        processes = [ORCHESTRATOR] + sorted({e["process"] for e in events} - {ORCHESTRATOR})
        pids = {p: i + 1 for i, p in enumerate(processes)}
        tids: dict[tuple[str, str], int] = {}
        out: list[dict[str, Any]] = []
        for process, pid in pids.items():
            out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process}})
            out.append(
                {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
            )
        for e in events:
            key = (e["process"], e["thread"])
            if key not in tids:
                tids[key] = len([k for k in tids if k[0] == e["process"]]) + 1
                out.append(
                    {
                        "ph": "M",
                        "name": "thread_name",
                        "pid": pids[e["process"]],
                        "tid": tids[key],
                        "args": {"name": e["thread"]},
                    }
                )
            common = {
                "name": e["name"],
                "cat": e["args"].get("action", e["process"]),
                "pid": pids[e["process"]],
                "tid": tids[key],
                "ts": round((e["start"] - t0) * 1e6, 3),
                "args": e["args"],
            }
            if e["thread"] in ASYNC_THREADS:
                ident = f"{e['process']}/{e['name']}/{e['args'].get('step')}/{e['args'].get('accumulation_round', 0)}"
                out.append(dict(common, ph="b", id=ident))
                out.append(dict(common, ph="e", id=ident, ts=round((e["end"] - t0) * 1e6, 3), args={}))
            else:
                out.append(dict(common, ph="X", dur=round((e["end"] - e["start"]) * 1e6, 3)))
        return {
            "traceEvents": out,
            "displayTimeUnit": "ms",
            "otherData": {
                "steps": f"{self.first}-{self.last}",
                "clock": "orchestrator wall clock, µs from the first span",
                "clock_offsets_seconds": self.offsets,
                "clock_round_trips_seconds": self.round_trips,
            },
        }

    def write(self, directory: Path) -> Path:
        path = Path(directory) / "trace.json"
        path.write_text(json.dumps(self.chrome_trace()), encoding="utf-8")
        return path
