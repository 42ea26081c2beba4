"""Generate the Python protobuf / gRPC modules from protos/redheart/v1/*.proto.

    redheart-gen-protos            # regenerate redheart/v1/*_pb2*.py in place
    redheart-gen-protos --check    # exit 1 when the committed modules drift from the .proto files

The generated modules are committed so that installing the package needs no code generator;
CI runs ``--check`` so they can never silently drift from the contracts.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from redheart.cli_common import CONTEXT_SETTINGS, ExitCodeCommand

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "redheart" / "v1"


def _generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # test extra; not needed at run time

    protos = sorted((PROTO_ROOT / "redheart" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT / 'redheart' / 'v1'}")
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see the messages above)")
    return sorted((out_dir / "redheart" / "v1").glob("*_pb2*.py*"))


@click.command(
    cls=ExitCodeCommand,
    context_settings=CONTEXT_SETTINGS,
    help="""Generate the Python
protobuf / gRPC modules (redheart/v1/*_pb2*.py) from protos/redheart/v1/*.proto.

\b
Examples:
  redheart-gen-protos            # regenerate redheart/v1/ in place (after editing a .proto)
  redheart-gen-protos --check    # exit 1 when the committed modules drift from the .proto files

Exit codes: 0 written / up to date, 1 drift or protoc failed, 2 bad arguments.""",
)
@click.option("--check", is_flag=True, help="fail (exit 1) if the committed modules differ; write nothing")
def gen_protos(check: bool) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generated = _generate(Path(tmp))
        if check:
            drift = []
            names = {p.name for p in generated}
            committed = {p.name for p in OUT_PACKAGE.glob("*_pb2*.py*")}
            drift += sorted(names ^ committed)
            for path in generated:
                target = OUT_PACKAGE / path.name
                if target.exists() and not filecmp.cmp(path, target, shallow=False):
                    drift.append(path.name)
            if drift:
                print("generated protobuf modules drifted from protos/: " + ", ".join(drift), file=sys.stderr)
                print("fix: run `redheart-gen-protos` and commit redheart/v1/", file=sys.stderr)
                return 1
            print(f"protobuf modules up to date ({len(generated)} files)")
            return 0
        OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
        for path in generated:
            (OUT_PACKAGE / path.name).write_bytes(path.read_bytes())
        (OUT_PACKAGE / "__init__.py").touch()
        print(f"wrote {len(generated)} files to {OUT_PACKAGE}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from redheart.cli_common import invoke

    return invoke(gen_protos, argv, prog_name="redheart-gen-protos")


if __name__ == "__main__":
    sys.exit(main())
