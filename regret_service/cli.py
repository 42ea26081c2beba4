"""``redheart-regret``: run the regret service on its own.

    redheart-regret --config hybrid.toml [--set regret.num_workers=2 ...] [--host H] [--port P]
                    [--metrics-port M] [--log-level INFO]

Flags win over the file (and the environment): ``--port 0`` / ``--metrics-port 0`` bind any free
port, reported in the READY line. In the file, ``regret.metrics_port = 0`` disables /metrics.

Prints exactly one line on stdout once the service is SERVING (everything else goes to stderr)::

    REDHEART_READY service=regret port=<bound port> metrics_port=<bound metrics port or 0>

SIGTERM / SIGINT: health NOT_SERVING, in-flight calls get 10 s to finish, workers stop, exit 0.
Exit code 2: a configuration error (the message names the file and line); 1: the service failed.

Only the standard library, click and the small redheart.cli_common are imported at module level:
the worker processes are started with the spawn method, which re-imports the main module in every
worker.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

import click

from redheart.cli_common import command, config_options, invoke, port_type, setup_logging

GRACE_SECONDS = 10.0

log = logging.getLogger("regret_service")

HELP = """Red Heart regret service: counterfactual regret by Bentham's felicific calculus over gRPC.

\b
Examples:
  redheart-regret --config hybrid.toml
  redheart-regret --config hybrid.toml --set regret.num_workers=2 --port 0 --metrics-port 0
  REDHEART_REGRET__NUM_WORKERS=2 redheart-regret --config hybrid.toml

\b
Prints one line on stdout once SERVING:
  REDHEART_READY service=regret port=<port> metrics_port=<port or 0>

Exit codes: 0 stopped by SIGTERM/SIGINT, 1 the service failed, 2 bad configuration or arguments."""


@command(HELP)
@config_options("the run's TOML file (uses [regret], [wire], [metrics])")
@click.option("--host", default=None, help="interface to bind (default: regret.host)")
@click.option(
    "--port",
    type=port_type(),
    default=None,
    help="port to listen on, 0 for any free port (default: regret.port)",
)
@click.option(
    "--metrics-port",
    type=port_type(),
    default=None,
    help="Prometheus /metrics port, 0 for any free port (default: regret.metrics_port, "
    "where 0 disables; metrics.enabled = false disables both)",
)
def cli(config_path, overrides, log_level, host, port, metrics_port) -> int:
    setup_logging(log_level, "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    return serve(config_path, list(overrides), host, port, metrics_port)


def serve(
    config_path: str, overrides: list[str], host: str | None, port: int | None, metrics_port_flag: int | None
) -> int:
    from redheart.config import ConfigError, load_config

    try:
        config = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        print(f"redheart-regret: {exc}", file=sys.stderr)
        return 2

    from redheart.metrics_common import start_metrics_endpoint
    from regret_service.server import create_server

    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)  # no logging here: the handler may interrupt a thread holding its lock
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        server, port = create_server(config, host=host, port=port)
    except ConfigError as exc:
        print(f"redheart-regret: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # port taken, workers that cannot start
        print(f"redheart-regret: cannot start: {exc}", file=sys.stderr)
        return 1

    # Same convention as the stages: the flag's 0 asks for any free port (the orchestrator reads the
    # bound one from the READY line); the config key's 0 disables the endpoint.
    metrics_port = config.regret.metrics_port if metrics_port_flag is None else metrics_port_flag
    serve_metrics = config.metrics.enabled and (metrics_port != 0 or metrics_port_flag == 0)
    bound_metrics = 0
    http_server = None
    try:
        if serve_metrics:
            http_server, bound_metrics = start_metrics_endpoint(
                server.registry, config.metrics.host, metrics_port
            )
            log.info("metrics on http://%s:%d/metrics", config.metrics.host, bound_metrics)
    except OSError as exc:
        print(
            f"redheart-regret: cannot serve metrics on {config.metrics.host}:{metrics_port}: {exc}",
            file=sys.stderr,
        )
        server.stop(0)
        return 1

    print(f"REDHEART_READY service=regret port={port} metrics_port={bound_metrics}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
        name = signal.Signals(received[0]).name if received else "stop"
        log.info("received %s: health NOT_SERVING, in-flight calls get %.0f s", name, GRACE_SECONDS)
    finally:
        server.stop(GRACE_SECONDS)
        if http_server is not None:
            http_server.shutdown()
    from redheart.process import exit_after_shutdown

    exit_after_shutdown(0, "regret service")  # why not a plain return: see its docstring


def main(argv: Sequence[str] | None = None) -> int:
    return invoke(cli, argv, prog_name="redheart-regret")


if __name__ == "__main__":
    sys.exit(main())
