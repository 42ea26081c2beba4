"""``redheart-cpu-stage --config hybrid.toml``: run the CPU stage service."""

import sys

from cpu_stage.server import create_server
from redheart.stage_service import run_stage_cli


def main(argv: list[str] | None = None) -> int:
    return run_stage_cli("cpu", create_server, argv)


if __name__ == "__main__":
    sys.exit(main())
