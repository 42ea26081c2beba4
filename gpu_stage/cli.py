"""``redheart-gpu-stage --config hybrid.toml``: run the GPU stage service."""

import sys

from gpu_stage.server import create_server
from redheart.stage_service import run_stage_cli


def main(argv: list[str] | None = None) -> int:
    return run_stage_cli("gpu", create_server, argv)


if __name__ == "__main__":
    sys.exit(main())
