"""Process helpers shared by the service commands."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

log = logging.getLogger(__name__)

PARENT_ENV = "REDHEART_PARENT_PID"


def watch_parent(stop: threading.Event, interval: float = 1.0) -> threading.Thread | None:
    """When started by a local orchestrator (REDHEART_PARENT_PID set), stop when it is gone.

    The orchestrator starts services in their own process group so Ctrl-C reaches it first; the
    price is that a SIGKILLed orchestrator would leave them running forever. This watchdog makes
    such orphans shut down by themselves (they would be useless anyway: the run resumes with
    new ones).
    """
    raw = os.environ.get(PARENT_ENV)
    if not raw:
        return None
    try:
        parent = int(raw)
    except ValueError:
        return None

    def loop() -> None:
        while not stop.wait(interval):
            if os.getppid() != parent:
                log.warning("the orchestrator (pid %d) is gone: shutting down", parent)
                stop.set()
                return

    thread = threading.Thread(target=loop, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def exit_after_shutdown(code: int, service: str) -> NoReturn:
    """End a service process with ``code`` once its own shutdown is complete.

    Called by the service commands after they stopped their gRPC server, aborted the step in
    flight, and joined the threads they started. The interpreter is then left with ``os._exit``
    rather than a normal teardown, on purpose: gRPC's C-core threads (event engine, timer manager)
    cannot be joined from Python, grpc's worker threads are daemon threads (they inherit it from
    grpc's own polling thread), and a daemon thread that is inside torch or grpc C++ code when
    CPython finalizes is killed with pthread_exit, whose forced unwind through a ``noexcept`` C++
    frame calls std::terminate: "terminate called without an active exception" and exit -6
    (SIGABRT), seen at random in CI on both stages. A normal teardown adds nothing here (no
    buffered state is left behind: logs and std streams are flushed below, checkpoints are
    written with fsync), so exiting without one makes the exit code honest.
    """
    if code == 0:
        ours = [t.name for t in threading.enumerate() if t.is_alive() and t.name.startswith(_OUR_THREADS)]
        if ours:
            log.warning("%s: threads still running at exit: %s", service, ", ".join(sorted(ours)))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


_OUR_THREADS = ("cpu-sender", "gpu-sender", "parent-watchdog", "regret-")
"""Names of the threads the services start themselves: each should be joined before the exit
(a name still listed is a shutdown step that did not finish, worth a warning)."""
