"""``redheart-gpu-stage --config hybrid.toml``: run the GPU stage service (``--help`` for the options)."""

import sys
from collections.abc import Sequence

from gpu_stage.server import create_server
from redheart.cli_common import invoke, stage_command

cli = stage_command("gpu", create_server)


def main(argv: Sequence[str] | None = None) -> int:
    return invoke(cli, argv, prog_name="redheart-gpu-stage")


if __name__ == "__main__":
    sys.exit(main())
