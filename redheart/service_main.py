"""The process main of every service: the CPU stage, the GPU stage and the regret service.

:func:`run_service` does, once for all of them: logging set-up, configuration loading, the
server's start (through the service's own ``build`` callable), the /metrics endpoint, the
SIGTERM / SIGINT handlers, the parent watchdog, the ready line the launcher waits for::

    REDHEART_READY service=<name> port=<bound port> metrics_port=<bound metrics port or 0>

the drain on a signal (health NOT_SERVING, in-flight calls get the grace period) and the exit
codes: 0 stopped, 1 the service failed to start, 2 bad configuration (redheart/cli_common.py).

What differs between the services (their names, the wording of their messages, two start-up
choices) is a :class:`ServiceSpec`; what only a service knows (which server to start, which
ports its section defaults to, what it logs once listening) is its ``build`` callable.

Only the standard library and redheart.process are imported at module level: the regret service's
workers are spawned, which re-imports the main module (and so this one) in every worker.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redheart.process import exit_after_shutdown, watch_parent

if typing.TYPE_CHECKING:
    from redheart.cli_common import ServiceArgs
    from redheart.config import HybridConfig

StartErrors = tuple[tuple[tuple[type[BaseException], ...], int, str], ...]
"""``(exception types, exit code, message)`` rows, tried in order; ``{exc}`` in the message is the error."""


@dataclass(frozen=True)
class ServiceSpec:
    """What differs between the services' mains; every message keeps each service's own wording."""

    name: str
    """The ``service=`` of the ready line: ``cpu_stage``, ``gpu_stage``, ``regret``."""
    label: str
    """How the exit check names the service (``cpu stage``, ``regret service``)."""
    log_format: str
    log: logging.Logger
    """The logger of the main's own lines (its name is part of every line)."""
    error_prefix: str
    """Starts the configuration and /metrics error messages on stderr (``error``, ``redheart-regret``)."""
    start_errors: StartErrors
    """The failures of ``build`` that end the process with a message instead of a traceback."""
    drain_note: str
    """Logged after ``received SIGTERM: `` when a signal stops the service."""
    stopped_line: str | None = None
    """Logged once the server stopped, if given."""
    signals_before_start: bool = False
    """Handle SIGTERM / SIGINT already while the server starts (the regret service, whose workers
    take a while), instead of from just before the ready line (the stages)."""
    watch_parent: bool = True
    """Stop when the orchestrator that started the process is gone (redheart.process.watch_parent)."""
    grace: float | None = 10.0
    """Seconds the in-flight calls get to finish after a signal (None: the server's own default,
    the regret service's ``regret.drain_seconds``)."""


@dataclass
class Started:
    """A started server, as a service's ``build`` callable returns it."""

    server: Any
    """Has ``stop(grace)``: health NOT_SERVING, in-flight calls finish, threads joined
    (``stop(None)``: the server's own grace)."""
    port: int
    registry: Any
    """The prometheus CollectorRegistry /metrics serves."""
    metrics_port: int
    """The configuration's /metrics port: 0 turns the endpoint off unless ``--metrics-port 0`` asks for any."""
    announce: Callable[[int], None] | None = None
    """Logs what the service says once listening, given the bound metrics port (0: off)."""


def run_service(
    spec: ServiceSpec, build: Callable[[HybridConfig, ServiceArgs], Started], args: ServiceArgs
) -> int:
    """The process main: returns 1 or 2 when the service cannot start; once started it never
    returns, it ends the process with exit code 0 after the drain (redheart.process.exit_after_shutdown)."""
    from redheart.cli_common import setup_logging
    from redheart.config import ConfigError, load_config

    setup_logging(args.log_level, spec.log_format)
    try:
        config = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"{spec.error_prefix}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)  # no logging here: the handler may interrupt a thread holding its lock
        stop.set()

    if spec.signals_before_start:
        _handle_signals(on_signal)
    try:
        started = build(config, args)
    except Exception as exc:
        for types, code, message in spec.start_errors:
            if isinstance(exc, types):
                print(message.format(exc=exc), file=sys.stderr)
                return code
        raise
    served = _serve_metrics(spec, config, started, args.metrics_port)
    if served is None:
        return 1
    http_server, bound_metrics = served
    if not spec.signals_before_start:
        _handle_signals(on_signal)
    watcher = watch_parent(stop) if spec.watch_parent else None
    if started.announce is not None:
        started.announce(bound_metrics)
    print(f"REDHEART_READY service={spec.name} port={started.port} metrics_port={bound_metrics}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
        if received:
            spec.log.info("received %s: %s", signal.Signals(received[0]).name, spec.drain_note)
    finally:
        started.server.stop(spec.grace)
        if http_server is not None:
            http_server.shutdown()
    if watcher is not None:
        watcher.join(timeout=2.0)
    if spec.stopped_line:
        spec.log.info("%s", spec.stopped_line)
    exit_after_shutdown(0, spec.label)  # why not a plain return: see its docstring


def _handle_signals(handler: Callable) -> None:
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _serve_metrics(
    spec: ServiceSpec, config: HybridConfig, started: Started, flag: int | None
) -> tuple[Any, int] | None:
    """Start /metrics when asked: ``(http server or None, bound port or 0)``; None when the port
    cannot be bound (the server is stopped then, and the process exits 1)."""
    from redheart.metrics_common import start_metrics_endpoint

    # The flag's 0 asks for any free port (the orchestrator reads the bound one from the ready
    # line); the configuration's 0 turns the endpoint off.
    metrics_port = started.metrics_port if flag is None else flag
    if not (config.metrics.enabled and (metrics_port != 0 or flag == 0)):
        return None, 0
    try:
        return start_metrics_endpoint(started.registry, config.metrics.host, metrics_port)
    except OSError as exc:
        print(
            f"{spec.error_prefix}: cannot serve metrics on {config.metrics.host}:{metrics_port}: {exc}",
            file=sys.stderr,
        )
        started.server.stop(0)
        return None
