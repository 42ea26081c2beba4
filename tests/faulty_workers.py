"""Faulty regret worker bodies for the crash-path tests: ``WorkerPool(n, worker_target=...)``.

Importable by the spawned workers: multiprocessing's spawn gives the child the parent's sys.path,
where pytest put tests/.
"""

from __future__ import annotations

import os
import signal
from multiprocessing import connection as mp_connection


def crashing_worker_main(
    conn: mp_connection.Connection, regrets_per_step: int, bentham_per_regret: int
) -> None:
    """A worker that starts normally and kills itself (SIGKILL) on its first job.

    For drills and tests of the crash path: ``WorkerPool(n, worker_target=crashing_worker_main)``
    must fail a request cleanly (WorkerCrashed) after re-running the chunk once, never hang.
    """
    conn.send(("ready", os.getpid()))
    try:
        conn.recv()
    except (EOFError, OSError):
        return
    os.kill(os.getpid(), signal.SIGKILL)
