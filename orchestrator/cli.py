"""``redheart-orchestrate``: train, verify or pre-flight-check a Red Heart hybrid pipeline run.

    redheart-orchestrate --config examples/hybrid.toml                 # train (services started locally)
    redheart-orchestrate --config hybrid.toml --set launch.mode=\"remote\" # connect to running services
    redheart-orchestrate --config hybrid.toml --verify                 # pipeline == single process?
    redheart-orchestrate --config hybrid.toml --check                  # pre-flight check only
    redheart-orchestrate --config hybrid.toml --resume                 # continue from the latest checkpoint

Exit codes: 0 success, 1 the run failed (message says why), 2 bad configuration or arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redheart-orchestrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's TOML file (see docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, e.g. --set train.max_steps=10 (repeatable; beats environment and file)")
    parser.add_argument("--output-dir", help="where the run writes (orchestrator.output_dir)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true", help="compare a few pipelined steps with single-process training")
    mode.add_argument("--check", action="store_true", help="run the pre-flight check and exit")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                        help="continue from the latest complete checkpoint, or from PATH (a step directory or checkpoint root)")
    parser.add_argument("--log-level", default=os.environ.get("REDHEART_LOG_LEVEL", "INFO"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s orchestrator %(levelname)s %(name)s: %(message)s")
    from redheart.config import ConfigError, load_config

    try:
        config = load_config(args.config, overrides=args.overrides, output_dir=args.output_dir)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from orchestrator.preflight import preflight
    from orchestrator.trainer import HybridDistributedTrainer, RunError
    from redheart.data import DataError
    from redheart.rpc import ServiceError

    if args.check:
        report = preflight(config, out=sys.stdout)
        return 0 if report.ok else 1
    report = preflight(config, out=sys.stderr, quiet_when_ok=True, resume=bool(args.resume))
    if not report.ok:
        print("error: the pre-flight check failed (details above); fix the problems or run --check", file=sys.stderr)
        return 1
    trainer = HybridDistributedTrainer(config, resume=args.resume, config_path=args.config)
    try:
        if args.verify:
            from orchestrator.verify import verify

            return 0 if verify(trainer).ok else 1
        result, checkpoint = trainer.train()
    except (RunError, ServiceError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume", file=sys.stderr)
        return 130
    final = result.get("final_validation") or {}
    print(f"done: {result['steps']} steps in {result['wall_seconds']:.1f}s "
          f"({result['samples_per_second']:.1f} samples/s); report {config.output_dir() / 'report.json'}; "
          f"checkpoint {checkpoint}")
    if final:
        from orchestrator.trainer import _fmt_metrics

        print(f"validation: {_fmt_metrics(final)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
