"""What every ``redheart-*`` command shares: the click option set, logging set-up, exit-code handling.

Options shared by the commands that read a run's configuration:

    --config PATH            the run's TOML file            (environment: REDHEART_CONFIG)
    --set SECTION.KEY=VALUE  override one key, repeatable
    --log-level LEVEL        DEBUG, INFO, WARNING or ERROR  (environment: REDHEART_LOG_LEVEL)

Configuration values keep one precedence, highest first: ``--set`` > environment
(``REDHEART_SECTION__KEY``, read by :func:`redheart.config.load_config`) > the TOML file > defaults.
The two command-level variables above follow click's rule, which is the same: a flag beats its
environment variable.

Exit codes are the same for every command: 0 success, 1 the run or service failed, 2 bad arguments
or configuration, 130 interrupted. :func:`invoke` keeps ``main(argv) -> int`` callable from Python
(tests, the console scripts' ``sys.exit(main())``) instead of click's own ``sys.exit``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Lets `-h` work like `--help`, and wide enough that the examples in docstrings are not re-wrapped.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class ExitCodeCommand(click.Command):
    """A command whose callback returns the exit status (click otherwise ignores the return value,
    so CliRunner and the console script would both see 0 for a failed run)."""

    def invoke(self, ctx: click.Context) -> Any:
        result = super().invoke(ctx)
        ctx.exit(int(result or 0))


def command(help: str) -> Callable:
    """``@click.command`` for a redheart command: exit status from the callback, -h, wide help."""
    return click.command(cls=ExitCodeCommand, context_settings=CONTEXT_SETTINGS, help=help)


def port_type() -> click.IntRange:
    return click.IntRange(0, 65535)


def config_options(config_help: str = "the run's TOML file (see docs/config.md)") -> Callable:
    """Decorator adding --config, --set and --log-level to a click command."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option(
            "--log-level",
            envvar="REDHEART_LOG_LEVEL",
            show_envvar=True,
            default="INFO",
            show_default=True,
            type=click.Choice(LOG_LEVELS, case_sensitive=False),
            help="how much the process logs (to stderr)",
        )(fn)
        fn = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.KEY=VALUE",
            help="override a config key, e.g. --set train.max_steps=10 "
            "(repeatable; beats environment and file)",
        )(fn)
        # A plain string, not click.Path(exists=True): load_config's message names the fix.
        fn = click.option(
            "--config",
            "config_path",
            required=True,
            envvar="REDHEART_CONFIG",
            show_envvar=True,
            metavar="PATH",
            help=config_help,
        )(fn)
        return fn

    return decorate


def setup_logging(level: str, fmt: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=fmt)


def invoke(command: click.Command, argv: Sequence[str] | None, prog_name: str) -> int:
    """Run a click command and return its exit status (click would call sys.exit itself).

    Bad arguments print click's usage message and raise SystemExit(2), like argparse did, so a
    caller of ``main([...])`` sees the same behaviour as before.
    """
    try:
        result = command.main(
            args=list(argv) if argv is not None else None, prog_name=prog_name, standalone_mode=False
        )
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    if result is None:
        return 0
    return int(result)


@dataclass
class ServiceArgs:
    """The parsed command line of a service (``redheart-cpu-stage``, ``redheart-gpu-stage``,
    ``redheart-regret``), as redheart/service_main.py takes it."""

    config: str
    overrides: list[str] = field(default_factory=list)
    host: str | None = None
    port: int | None = None
    metrics_port: int | None = None
    log_level: str = "INFO"


StageArgs = ServiceArgs
"""The stages' name for it (older code)."""


def stage_command(stage: str, create_server: Callable) -> click.Command:
    """The click command of one stage service; the service itself is ``run_stage_cli``."""

    @command(
        help=f"""Run the Red Heart {stage.upper()} pipeline stage service.

\b
Examples:
  redheart-{stage}-stage --config hybrid.toml
  redheart-{stage}-stage --config hybrid.toml --port 0 --metrics-port 0   # any free ports
  REDHEART_{stage.upper()}_STAGE__THREADS=8 redheart-{stage}-stage --config hybrid.toml

\b
Prints one line on stdout once SERVING:
  REDHEART_READY service={stage}_stage port=<port> metrics_port=<port or 0>

Exit codes: 0 stopped by SIGTERM/SIGINT, 1 the service failed, 2 bad configuration or arguments.""",
    )
    @config_options(f"the run's TOML file (reads [model], [{stage}_stage], [wire], [metrics])")
    @click.option("--host", default=None, help=f"interface to bind (default: {stage}_stage.host)")
    @click.option(
        "--port",
        type=port_type(),
        default=None,
        help=f"port to bind, 0 for any (default: {stage}_stage.port)",
    )
    @click.option(
        "--metrics-port",
        type=port_type(),
        default=None,
        help=f"/metrics port, 0 for any (default: {stage}_stage.metrics_port)",
    )
    def stage_main(config_path, overrides, log_level, host, port, metrics_port) -> int:
        from redheart.stage.main import run_stage_cli

        args = ServiceArgs(
            config=config_path,
            overrides=list(overrides),
            host=host,
            port=port,
            metrics_port=metrics_port,
            log_level=log_level,
        )
        return run_stage_cli(stage, create_server, args)

    return stage_main
