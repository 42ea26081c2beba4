"""``redheart-orchestrate``: train, verify or pre-flight-check a Red Heart hybrid pipeline run.

Exit codes: 0 success, 1 the run failed (message says why), 2 bad configuration or arguments,
130 interrupted (resume with --resume).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from redheart.cli_common import command, config_options, invoke, setup_logging

HELP = """Train, verify or pre-flight-check a Red Heart hybrid pipeline run.

\b
Examples:
  redheart-orchestrate --config examples/hybrid.toml                   # train (services started locally)
  redheart-orchestrate --config hybrid.toml --set launch.mode='"remote"' # connect to running services
  redheart-orchestrate --config hybrid.toml --verify                   # pipeline == single process?
  redheart-orchestrate --config hybrid.toml --check                    # pre-flight check only
  redheart-orchestrate --config hybrid.toml --resume                   # continue from the latest checkpoint
  redheart-orchestrate --config hybrid.toml --trace 10-12              # timeline of steps 10..12: trace.json
  REDHEART_TRAIN__MAX_STEPS=10 redheart-orchestrate --config hybrid.toml

Precedence of configuration values: --set > environment (REDHEART_SECTION__KEY) > file > defaults.

Exit codes: 0 success, 1 the run failed (the message says why), 2 bad configuration or arguments,
130 interrupted."""


def _trace_steps(_ctx, _param, value: str | None) -> tuple[int, int] | None:
    from orchestrator.trace import parse_steps

    try:
        return None if value is None else parse_steps(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@command(HELP)
@config_options()
@click.option(
    "--output-dir", default=None, metavar="DIR", help="where the run writes (orchestrator.output_dir)"
)
@click.option("--verify", is_flag=True, help="compare a few pipelined steps with single-process training")
@click.option("--check", is_flag=True, help="run the pre-flight check and exit")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="latest",
    default=None,
    metavar="[PATH]",
    help="continue from the latest complete checkpoint, or from PATH (a step directory or checkpoint root)",
)
@click.option(
    "--trace",
    "trace_steps",
    default=None,
    metavar="STEPS",
    callback=_trace_steps,
    help="write <output_dir>/trace.json (Chrome trace events) for these steps, e.g. 10-12 or 5",
)
def cli(config_path, overrides, log_level, output_dir, verify, check, resume, trace_steps) -> int:
    if verify and check:
        raise click.UsageError("--verify and --check cannot be combined (pick one)")
    setup_logging(log_level, "%(asctime)s orchestrator %(levelname)s %(name)s: %(message)s")
    from redheart.config import ConfigError, load_config

    try:
        config = load_config(config_path, overrides=list(overrides), output_dir=output_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from orchestrator.preflight import preflight
    from orchestrator.trainer import HybridDistributedTrainer, RunError
    from redheart.data import DataError
    from redheart.rpc import ServiceError

    if check:
        report = preflight(config, out=sys.stdout)
        return 0 if report.ok else 1
    report = preflight(config, out=sys.stderr, quiet_when_ok=True, resume=bool(resume))
    if not report.ok:
        print(
            "error: the pre-flight check failed (details above); fix the problems or run --check",
            file=sys.stderr,
        )
        return 1
    trainer = HybridDistributedTrainer(
        config, resume=resume, config_path=config_path, trace_steps=trace_steps
    )
    try:
        if verify:
            from orchestrator.verify import verify as run_verify

            return 0 if run_verify(trainer).ok else 1
        result, checkpoint = trainer.train()
    except (RunError, ServiceError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    final = result.get("final_validation") or {}
    print(
        f"done: {result['steps']} steps in {result['wall_seconds']:.1f}s "
        f"({result['samples_per_second']:.1f} samples/s); report {config.output_dir() / 'report.json'}; "
        f"checkpoint {checkpoint}"
    )
    if final:
        from orchestrator.trainer import _fmt_metrics

        print(f"validation: {_fmt_metrics(final)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return invoke(cli, argv, prog_name="redheart-orchestrate")


if __name__ == "__main__":
    sys.exit(main())
