"""``redheart-cpu-stage --config hybrid.toml``: run the CPU stage service (``--help`` for the options)."""

import sys
from collections.abc import Sequence

from cpu_stage.server import create_server
from redheart.cli_common import invoke, stage_command

cli = stage_command("cpu", create_server)


def main(argv: Sequence[str] | None = None) -> int:
    return invoke(cli, argv, prog_name="redheart-cpu-stage")


if __name__ == "__main__":
    sys.exit(main())
