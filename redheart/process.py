"""Process helpers shared by the service commands."""

from __future__ import annotations

import logging
import os
import threading

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

