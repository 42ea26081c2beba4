"""One regret worker: the process body and how the pool starts it (spawn, pipe, ready handshake).

A worker is started with the spawn method: a fresh interpreter that imports only this module,
numpy and :mod:`redheart.calculus` (no torch, no grpc). The pool's supervision (which worker
scores which chunk, replacing the dead ones) is :class:`regret_service.logic.WorkerPool`.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from typing import Any

from redheart import calculus
from regret_service.pool_types import WorkerCrashed

_SPAWN = multiprocessing.get_context("spawn")


def worker_main(conn: mp_connection.Connection, regrets_per_step: int, bentham_per_regret: int) -> None:
    """Body of a worker process: answer (job, rows, explain) messages until told to stop.

    Replies are (job, ok, payload, busy_seconds); payload is a dict of arrays (or the error text).
    """
    # Ctrl-C goes to the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nothing left to do
            return
        if message is None:
            return
        job, rows, explain = message
        start = time.perf_counter()
        try:
            result = calculus.score(rows, regrets_per_step, bentham_per_regret)
            payload: Any = {"regret": result.regret, "best_index": result.best_index}
            if explain:
                payload.update(
                    actual_utility=result.actual_utility,
                    counterfactual_utilities=result.counterfactual_utilities,
                    actual_perspectives=result.actual_perspectives,
                    best_perspectives=result.best_perspectives,
                )
            ok = True
        except Exception as exc:  # a bad chunk must not kill the worker
            payload, ok = f"{type(exc).__name__}: {exc}", False
        conn.send((job, ok, payload, time.perf_counter() - start))


@dataclass
class Slot:
    """One place in the pool: its worker process, the pipe to it, its counters."""

    index: int
    process: Any = None
    conn: mp_connection.Connection | None = None
    pid: int = 0
    job_seq: int = 0
    busy_seconds: float = 0.0
    restarts: int = 0


def spawn(slot: Slot, target: Callable[..., None], regrets_per_step: int, bentham_per_regret: int):
    """Start a worker process for ``slot`` (not adopted yet): ``(process, the parent's end of its pipe)``."""
    parent_conn, child_conn = _SPAWN.Pipe(duplex=True)
    for conn in (parent_conn, child_conn):
        enlarge_buffers(conn)
    process = _SPAWN.Process(
        target=target,
        args=(child_conn, regrets_per_step, bentham_per_regret),
        name=f"redheart-regret-worker-{slot.index}",
        daemon=True,  # never outlive the service process
    )
    process.start()
    child_conn.close()  # the child holds its own copy; closing ours makes EOF visible
    return process, parent_conn


def await_ready(slot: Slot, process, conn, limit: float) -> None:
    """Wait up to ``limit`` s for the worker's ready message, then adopt it into ``slot``;
    WorkerCrashed (the process killed) when it exits or stays silent."""
    ready = mp_connection.wait([conn, process.sentinel], timeout=limit)
    message = None
    if conn in ready or conn.poll():
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = None
    if not (isinstance(message, tuple) and message and message[0] == "ready"):
        if process.is_alive():
            process.kill()
        process.join(timeout=2.0)
        conn.close()
        why = "did not start in time" if not ready else f"exited with code {process.exitcode} while starting"
        raise WorkerCrashed(f"regret worker {slot.index} {why}")
    slot.process, slot.conn, slot.pid = process, conn, int(message[1])


_SOCKET_BUFFER = 4 << 20


def enlarge_buffers(conn: mp_connection.Connection) -> None:
    """Let a whole chunk sit in the socket buffer (the kernel caps it at net.core.wmem_max).

    With the default ~200 KB the parent's send of a 10k-row chunk blocks until that worker has read
    most of it, so the next worker starts late; with room for the chunk the sends return at once.
    """
    try:
        # A dup of the descriptor shares the socket, so the options stick after closing the dup.
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
    except OSError:  # not a socket (another platform's Pipe): keep the defaults
        pass
