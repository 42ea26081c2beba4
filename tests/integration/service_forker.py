"""Starts real service processes cheaply, for tests that start and stop them many times.

A fresh interpreter spends seconds importing torch and grpc before a stage serves; stopping each
service 50 times that way would take minutes of CPU. This helper imports the service commands
once and then forks: each child runs the command's own ``main(argv)`` (the same code as
``python -m cpu_stage.cli ...``: its signal handlers, shutdown and exit code) in a process of its
own. Nothing that starts threads (grpc channels or servers, torch compute) runs before a fork.

Protocol, one line each way:

    stdin:  spawn <tag> <log path> <module> <arg>...    -> stdout: spawned <tag> <pid>
    stdout: exited <tag> <pid> <exit code>               (negative: killed by that signal)

The child's stdout and stderr go to <log path> (its READY line included). Heavy imports happen in
``main`` only: the regret service starts its workers with the spawn method, which re-imports this
module in every worker.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback


def _child(log_path: str, module: str, argv: list[str]) -> int:
    """Runs in the forked child; returns the command's exit code, with which the child then
    leaves through the normal interpreter exit, as ``python -m <module>`` would."""
    import importlib
    import signal

    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = [module, *argv]
    try:
        return importlib.import_module(module).main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> int:
    # Imported here, before any fork, so that every child starts with them loaded.
    import torch._dynamo  # noqa: F401  (the optimizer's constructor imports it: seconds, once per process)

    import cpu_stage.cli  # noqa: F401
    import gpu_stage.cli  # noqa: F401
    import redheart.model  # noqa: F401
    import regret_service.cli  # noqa: F401
    import regret_service.server  # noqa: F401

    lock = threading.Lock()
    tags: dict[int, str] = {}
    out = sys.stdout

    def say(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()

    def reap() -> None:
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                threading.Event().wait(0.05)
                continue
            with lock:
                tag = tags.pop(pid, "?")
            say(f"exited {tag} {pid} {os.waitstatus_to_exitcode(status)}")

    threading.Thread(target=reap, daemon=True).start()
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] != "spawn":
            continue
        tag, log_path, module, argv = parts[1], parts[2], parts[3], parts[4:]
        with lock:  # the reaper must not see the child before its tag is known
            pid = os.fork()
            if pid == 0:
                return _child(log_path, module, argv)  # the child leaves the loop here
            tags[pid] = tag
        say(f"spawned {tag} {pid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
