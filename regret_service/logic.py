"""The regret worker pool: ``num_workers`` processes running :func:`redheart.calculus.score`.

No torch and no grpc here: this module is the logic of the service. The worker process itself
(its body, its start and ready handshake) is regret_service/worker.py, which is what each worker
imports (with the spawn start method, a worker starts a fresh interpreter and imports only that
module, numpy and :mod:`redheart.calculus`); the answers, errors and chunk planning are
regret_service/pool_types.py, re-exported here.

Why processes: scoring is numpy work in Python; threads of one process would be serialised by the
GIL around every numpy call. The parent splits a batch into contiguous chunks, one per worker, sends
them over pipes, and concatenates the answers in order. :func:`redheart.calculus.score` is
per-row independent, so the concatenation is bit-identical to scoring the batch in one call.

* Small batches (fewer than ``2 * small_batch`` rows, default 128) go to a single worker: below that
  the pipe round trips cost more than the scoring. Larger batches are cut into
  ``min(num_workers, usable CPUs, rows // small_batch)`` chunks of at least ``small_batch`` rows:
  cutting finer than the CPUs adds round trips without adding parallelism, and leaves the other
  workers free for concurrent requests (e.g. 4 workers on 2 cores serve 2 requests at once).
* Concurrent requests share the pool: a request takes the idle workers it can (at least one,
  waiting if needed) and feeds its remaining chunks to the workers it holds, so requests never
  deadlock waiting for each other's workers.
* A worker that dies (crash, OOM killer, ``kill -9``) is detected through its process sentinel,
  replaced by a fresh process in the same slot, and its in-flight chunk is re-run once on the
  replacement. A chunk whose worker dies twice fails the request with :class:`WorkerCrashed`
  (the service answers INTERNAL); nothing ever waits forever: every wait has the request's deadline.
* A monitor thread replaces workers that die while idle, so the alive count recovers by itself.
* Per worker slot the pool tracks busy seconds (time spent inside ``score``) and restarts, and
  reports them to an optional :class:`PoolListener` (the metrics module).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection as mp_connection

import numpy as np

from redheart import calculus
from regret_service.pool_types import (
    SMALL_BATCH,
    PoolClosed,
    PoolListener,
    PoolResult,
    PoolStats,
    PoolTimeout,
    WorkerCrashed,
    plan_chunks,
    usable_cpus,
)
from regret_service.worker import Slot, await_ready, spawn, worker_main

log = logging.getLogger(__name__)

__all__ = [
    "PoolClosed",
    "PoolListener",
    "PoolResult",
    "PoolStats",
    "PoolTimeout",
    "WorkerCrashed",
    "WorkerPool",
    "plan_chunks",
    "usable_cpus",
    "SMALL_BATCH",
    "worker_main",
]


@dataclass
class _InFlight:
    chunk: int
    job: int
    attempt: int


class WorkerPool:
    """``num_workers`` scoring processes; :meth:`score` is safe to call from many threads."""

    def __init__(
        self,
        num_workers: int,
        regrets_per_step: int = 7,
        bentham_per_regret: int = 3,
        *,
        small_batch: int = SMALL_BATCH,
        start_timeout: float = 60.0,
        listener: PoolListener | None = None,
        monitor_interval: float = 0.25,
        max_chunks: int | None = None,
        worker_target: Callable[..., None] = worker_main,
    ) -> None:
        """``max_chunks``: most chunks one request is cut into (default: min(num_workers, usable CPUs));
        ``worker_target``: the process body (tests pass a faulty one to exercise crash handling)."""
        if num_workers < 1:
            raise ValueError(f"num_workers = {num_workers} must be at least 1")
        calculus.check_counts(regrets_per_step, bentham_per_regret)
        self.num_workers = num_workers
        self.regrets_per_step = regrets_per_step
        self.bentham_per_regret = bentham_per_regret
        self.small_batch = max(1, small_batch)
        self.max_chunks = max(1, min(num_workers, max_chunks if max_chunks is not None else usable_cpus()))
        self.start_timeout = start_timeout
        self.listener = listener
        self.monitor_interval = monitor_interval
        self.worker_target = worker_target
        self._slots = [Slot(i) for i in range(num_workers)]
        self._idle: list[int] = []
        self._cond = threading.Condition()
        self._closed = False
        self._started = False
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._last_alive = -1

    # ---- lifecycle

    def start(self) -> None:
        """Start every worker and wait until each has imported the calculus and said ready."""
        if self._started:
            return
        self._started = True
        pending = [self._spawn(slot) for slot in self._slots]  # all start importing at once
        deadline = time.monotonic() + self.start_timeout
        try:
            for slot, (process, conn) in zip(self._slots, pending):
                self._await_ready(slot, process, conn, deadline)
        except BaseException:
            for process, conn in pending:  # including the ones not adopted by a slot yet
                if process.is_alive():
                    process.kill()
                process.join(timeout=2.0)
                conn.close()
            self.shutdown(timeout=1.0)
            raise
        with self._cond:
            self._idle = [s.index for s in self._slots]
            self._cond.notify_all()
        self._report_alive()
        self._monitor = threading.Thread(target=self._monitor_loop, name="regret-pool-monitor", daemon=True)
        self._monitor.start()
        log.info("regret pool: %d workers up (pids %s)", self.num_workers, self.worker_pids())

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the workers (politely, then by force after ``timeout``); idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2.0)
        for slot in self._slots:
            if slot.conn is not None:
                try:
                    slot.conn.send(None)
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=2.0)
            if slot.conn is not None:
                slot.conn.close()
        self._report_alive()

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- introspection

    def worker_pids(self) -> list[int]:
        return [slot.pid for slot in self._slots]

    def alive_count(self) -> int:
        return sum(1 for slot in self._slots if slot.process is not None and slot.process.is_alive())

    def stats(self) -> PoolStats:
        return PoolStats(
            busy_seconds=[s.busy_seconds for s in self._slots],
            restarts=[s.restarts for s in self._slots],
            alive=self.alive_count(),
            pids=self.worker_pids(),
        )

    # ---- scoring

    def score(
        self,
        bentham: np.ndarray,
        *,
        explain: bool = False,
        timeout: float | None = None,
        validate: bool = True,
    ) -> PoolResult:
        """Score a [B, 8] batch across the workers.

        Raises ValueError (invalid rows; pass ``validate=False`` only when the caller already ran
        ``calculus.validate_bentham``), WorkerCrashed, PoolTimeout or PoolClosed.
        """
        if not self._started:
            raise PoolClosed("the regret worker pool was not started (call start() first)")
        start = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        rows = np.ascontiguousarray(bentham)
        if validate:
            calculus.validate_bentham(rows)  # a bad row must fail here, not inside a worker
        batch = rows.shape[0]
        r, p = self.regrets_per_step, self.bentham_per_regret
        if batch == 0:
            detail = calculus.score(rows, r, p) if explain else None
            return PoolResult(
                np.zeros(0, np.float32), np.zeros(0, np.int64), detail, 0, 0, time.perf_counter() - start, 0
            )
        chunks = plan_chunks(batch, self.max_chunks, self.small_batch)
        payloads = self._run(rows, chunks, explain, deadline)
        regret = np.concatenate([pl["regret"] for pl in payloads])
        best = np.concatenate([pl["best_index"] for pl in payloads])
        detail = None
        if explain:
            detail = calculus.RegretResult(
                regret=regret,
                best_index=best,
                best_name=[calculus.COUNTERFACTUALS[i] for i in best.tolist()],
                actual_utility=np.concatenate([pl["actual_utility"] for pl in payloads]),
                counterfactual_utilities=np.concatenate([pl["counterfactual_utilities"] for pl in payloads]),
                actual_perspectives=np.concatenate([pl["actual_perspectives"] for pl in payloads]),
                best_perspectives=np.concatenate([pl["best_perspectives"] for pl in payloads]),
                regret_computations=batch * r,
                bentham_evaluations=batch * r * p,
            )
        return PoolResult(
            regret, best, detail, batch * r, batch * r * p, time.perf_counter() - start, len(chunks)
        )

    # long: one request's dispatch loop; the docstring says why it stays whole.
    def _run(
        self, rows: np.ndarray, chunks: list[tuple[int, int]], explain: bool, deadline: float | None
    ) -> list[dict]:
        """Score ``chunks`` of ``rows`` on the workers this request takes; their payloads in order.

        Over 80 lines on purpose: one request's dispatch loop, whose state (pending chunks, slots
        held, chunks in flight, attempts) the nested helpers and the cleanup on failure share;
        split up, that state would have to become an object of its own."""
        results: list[dict | None] = [None] * len(chunks)
        pending = list(range(len(chunks)))[::-1]  # pop() takes the next chunk in order
        owned: set[int] = set()  # slots this request holds (released exactly once)
        held: dict[int, _InFlight] = {}  # owned slots with a chunk in flight
        attempts = [0] * len(chunks)

        def release(index: int) -> None:
            owned.discard(index)
            self._release(index)

        def dispatch(slot: Slot, chunk: int) -> None:
            attempts[chunk] += 1
            lo, hi = chunks[chunk]
            while True:
                if not slot.process.is_alive():
                    self._replace(slot, reason="found dead before use")
                slot.job_seq += 1
                try:
                    slot.conn.send((slot.job_seq, rows[lo:hi], explain))
                except (OSError, ValueError):  # the pipe broke: the worker just died
                    self._replace(slot, reason="pipe broken on send")
                    continue
                held[slot.index] = _InFlight(chunk, slot.job_seq, attempts[chunk])
                return

        try:
            first = self._acquire(block=True, deadline=deadline)
            owned.add(first)
            dispatch(self._slots[first], pending.pop())
            while pending or held:
                while pending:  # take any other idle worker for the remaining chunks
                    extra = self._acquire(block=False, deadline=deadline)
                    if extra is None:
                        break
                    owned.add(extra)
                    dispatch(self._slots[extra], pending.pop())
                wait_for = []
                for index in held:
                    slot = self._slots[index]
                    wait_for += [slot.conn, slot.process.sentinel]
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolTimeout(f"scoring {chunks[-1][1]} scenarios did not finish before the deadline")
                if not mp_connection.wait(
                    wait_for, timeout=1.0 if remaining is None else min(remaining, 1.0)
                ):
                    continue
                for index in list(held):
                    slot, flight = self._slots[index], held[index]
                    reply = self._try_receive(slot, flight.job)
                    if reply is _NOTHING:
                        continue
                    del held[index]
                    lo, hi = chunks[flight.chunk]
                    if reply is _DEAD:
                        self._replace_dead(slot, flight, lo, hi)
                        dispatch(slot, flight.chunk)
                        continue
                    _job, ok, payload, busy = reply
                    self._add_busy(slot, busy)
                    if not ok:
                        raise WorkerCrashed(f"regret worker {index} failed on rows {lo}..{hi - 1}: {payload}")
                    results[flight.chunk] = payload
                    if pending:
                        dispatch(slot, pending.pop())
                    else:
                        release(index)
        except BaseException:
            # Workers still scoring for this request finish in the background before reuse;
            # the other slots go straight back.
            if held:
                threading.Thread(
                    target=self._drain, args=(dict(held),), name="regret-pool-drain", daemon=True
                ).start()
            for index in list(owned):
                if index not in held:
                    release(index)
            raise
        return results  # type: ignore[return-value]

    def _replace_dead(self, slot: Slot, flight: _InFlight, lo: int, hi: int) -> None:
        """The worker of ``slot`` died scoring rows lo..hi-1: replace it, so the chunk can be re-run
        on the replacement; WorkerCrashed when that was already the re-run (a chunk runs twice at most)."""
        exitcode = slot.process.exitcode
        if flight.attempt >= 2:
            # Leave the slot with a live process so the pool stays whole.
            self._replace(slot, reason=f"died (exit code {exitcode}) re-running rows {lo}..{hi - 1}")
            raise WorkerCrashed(
                f"regret worker {slot.index} died twice while scoring rows {lo}..{hi - 1} "
                f"(last exit code {exitcode}); the request was not scored"
            )
        log.warning(
            "regret worker %d (pid %d) died with exit code %s while scoring rows %d..%d; "
            "re-running them on a replacement",
            slot.index,
            slot.pid,
            exitcode,
            lo,
            hi - 1,
        )
        self._replace(slot, reason=f"died (exit code {exitcode})")

    def _try_receive(self, slot: Slot, job: int):
        """The reply to ``job`` if it is there, _DEAD if the worker died without one, else _NOTHING."""
        conn = slot.conn
        while True:
            try:
                if not conn.poll():
                    return _DEAD if not slot.process.is_alive() and not conn.poll() else _NOTHING
                reply = conn.recv()
            except (EOFError, OSError):
                return _DEAD
            if reply[0] == job:
                return reply
            # A reply to a job an aborted request left behind: account for it and drop it.
            self._add_busy(slot, reply[3])

    def _drain(self, held: dict[int, _InFlight]) -> None:
        """A request gave up with chunks in flight: wait for those replies (or deaths), then free the slots."""
        for index, flight in held.items():
            slot = self._slots[index]
            give_up = time.monotonic() + 30.0
            try:
                while not self._closed:
                    reply = self._try_receive(slot, flight.job)
                    if reply is _DEAD:
                        self._replace(slot, reason="died while its request was abandoned")
                        break
                    if reply is not _NOTHING:
                        self._add_busy(slot, reply[3])
                        break
                    if time.monotonic() > give_up:  # a worker that never answers is replaced
                        self._replace(slot, reason="did not answer within 30 s")
                        break
                    mp_connection.wait([slot.conn, slot.process.sentinel], timeout=0.5)
            except Exception as exc:
                if not self._closed:
                    log.error("regret worker %d could not be recovered: %s", index, exc)
            finally:
                self._release(index)

    def _add_busy(self, slot: Slot, seconds: float) -> None:
        slot.busy_seconds += seconds
        if self.listener is not None:
            self.listener.on_busy(slot.index, seconds)

    # ---- slots

    def _acquire(self, *, block: bool, deadline: float | None) -> int | None:
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed("the regret worker pool is shut down")
                if self._idle:
                    return self._idle.pop(0)
                if not block:
                    return None
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolTimeout("no regret worker became free before the deadline")
                self._cond.wait(timeout=remaining)

    def _try_acquire_slot(self, index: int) -> bool:
        with self._cond:
            if index in self._idle and not self._closed:
                self._idle.remove(index)
                return True
            return False

    def _release(self, index: int) -> None:
        with self._cond:
            if index not in self._idle:
                self._idle.append(index)
            self._cond.notify()

    # ---- processes

    def _spawn(self, slot: Slot):
        return spawn(slot, self.worker_target, self.regrets_per_step, self.bentham_per_regret)

    def _await_ready(self, slot: Slot, process, conn, deadline: float | None) -> None:
        limit = self.start_timeout if deadline is None else max(0.0, deadline - time.monotonic())
        await_ready(slot, process, conn, limit)

    def _replace(self, slot: Slot, *, reason: str) -> None:
        """Replace the (dead) process of a slot this thread holds. Raises WorkerCrashed if closed."""
        if self._closed:
            raise WorkerCrashed(f"regret worker {slot.index} {reason}, and the pool is shutting down")
        old_pid = slot.pid
        if slot.process is not None:
            if slot.process.is_alive():
                slot.process.kill()
            slot.process.join(timeout=2.0)
        if slot.conn is not None:
            slot.conn.close()
        process, conn = self._spawn(slot)
        self._await_ready(slot, process, conn, None)
        slot.restarts += 1
        log.warning("regret worker %d (pid %d) %s: replaced by pid %d", slot.index, old_pid, reason, slot.pid)
        if self.listener is not None:
            self.listener.on_restart(slot.index)
        self._report_alive()

    def _report_alive(self) -> None:
        alive = self.alive_count()
        if alive != self._last_alive:
            self._last_alive = alive
            if self.listener is not None:
                self.listener.on_alive(alive)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.monitor_interval):
            self._report_alive()
            for slot in self._slots:
                if slot.process is None or slot.process.is_alive():
                    continue
                if not self._try_acquire_slot(slot.index):
                    continue  # busy: the request holding it handles the death
                try:
                    self._replace(slot, reason=f"died while idle (exit code {slot.process.exitcode})")
                except Exception as exc:
                    if not self._closed:
                        log.error("could not replace regret worker %d: %s", slot.index, exc)
                finally:
                    self._release(slot.index)


_NOTHING = object()
_DEAD = object()
