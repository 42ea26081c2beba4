"""``redheart-regret``: run the regret service on its own.

    redheart-regret --config hybrid.toml [--set regret.num_workers=2 ...] [--host H] [--port P]
                    [--metrics-port M] [--log-level INFO]

Flags win over the file (and the environment): ``--port 0`` / ``--metrics-port 0`` bind any free
port, reported in the READY line. In the file, ``regret.metrics_port = 0`` disables /metrics.

Prints exactly one line on stdout once the service is SERVING (everything else goes to stderr)::

    REDHEART_READY service=regret port=<bound port> metrics_port=<bound metrics port or 0>

SIGTERM / SIGINT: health NOT_SERVING, in-flight calls get 10 s to finish, workers stop, exit 0.
Exit code 2: a configuration error (the message names the file and line); 1: the service failed.

Only the standard library, click and the small redheart.cli_common and redheart.service_main
(the main it shares with the stages) are imported at module level:
the worker processes are started with the spawn method, which re-imports the main module in every
worker.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click

from redheart.cli_common import ServiceArgs, command, config_options, invoke, port_type
from redheart.service_main import ServiceSpec, Started, run_service

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"

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
    return serve(config_path, list(overrides), host, port, metrics_port, log_level=log_level)


def serve(
    config_path: str,
    overrides: list[str],
    host: str | None,
    port: int | None,
    metrics_port_flag: int | None,
    log_level: str = "INFO",
) -> int:
    """The service main (redheart/service_main.py) with the flags as arguments."""
    args = ServiceArgs(
        config=config_path,
        overrides=list(overrides),
        host=host,
        port=port,
        metrics_port=metrics_port_flag,
        log_level=log_level,
    )
    return run_service(_spec(), _start, args)


def _spec() -> ServiceSpec:
    from redheart.config import ConfigError

    return ServiceSpec(
        name="regret",
        label="regret service",
        log_format=LOG_FORMAT,
        log=log,
        error_prefix="redheart-regret",
        # A configuration the server refuses is the file's fault (2); a port taken or workers that
        # cannot start are the service's (1).
        start_errors=(
            ((ConfigError,), 2, "redheart-regret: {exc}"),
            ((OSError, RuntimeError), 1, "redheart-regret: cannot start: {exc}"),
        ),
        drain_note="health NOT_SERVING, draining the calls in flight (regret.drain_seconds)",
        signals_before_start=True,  # starting the workers takes a while: a signal meanwhile stops it once up
        watch_parent=False,  # as it always was: only the stages watch the orchestrator
        grace=None,  # regret.drain_seconds, which the server holds
    )


def _start(config, args: ServiceArgs) -> Started:
    from regret_service.server import create_server

    server, port = create_server(config, host=args.host, port=args.port)

    def announce(bound_metrics: int) -> None:
        if bound_metrics:
            log.info("metrics on http://%s:%d/metrics", config.metrics.host, bound_metrics)

    return Started(server, port, server.registry, config.regret.metrics_port, announce)


def main(argv: Sequence[str] | None = None) -> int:
    return invoke(cli, argv, prog_name="redheart-regret")


if __name__ == "__main__":
    sys.exit(main())
