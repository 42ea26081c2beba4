"""redheart-export, redheart-predict, redheart-evaluate: the trained model as a product.

Every error (a checkpoint without manifest, a corrupt shard, a model folder of another shape, an
input line without text, ...) is one line naming the file and what is wrong, exit status 1, and
no output file is left half-written (outputs are written to a temporary file and renamed).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click


class _Failure(click.ClickException):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _run(fn, *args, **kwargs):
    """Known problems become a one-line error; anything else is a bug and keeps its traceback."""
    from redheart.data.schema import DataError
    from redheart.model_folder import ModelFolderError

    try:
        return fn(*args, **kwargs)
    except (ModelFolderError, DataError, ValueError, OSError) as exc:
        raise _Failure(str(exc)) from None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_inputs(path: Path) -> tuple[list[str], list[str | None]]:
    """Texts (and ids) of a JSONL file: one object per line with a non-empty "text"; "id" optional."""
    texts: list[str] = []
    ids: list[str | None] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(
                f'{path}:{number}: expected a JSON object with a "text", got {type(obj).__name__}'
            )
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            what = "missing" if "text" not in obj else f"{text!r:.40} is not a non-empty string"
            raise ValueError(f'{path}:{number}: "text" {what}; every line needs the scenario\'s text')
        sid = obj.get("id")
        if sid is not None and (isinstance(sid, bool) or not isinstance(sid, (str, int))):
            raise ValueError(f'{path}:{number}: "id" = {sid!r:.40} must be a string or integer')
        texts.append(text)
        ids.append(None if sid is None else str(sid))
    if not texts:
        raise ValueError(f"{path}: no scenarios (the file is empty or has only blank lines)")
    return texts, ids


def _format_option(machine: str, help: str):
    """--format auto|table|<machine>: a table for a person at a terminal, `machine` for a program."""
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["auto", "table", machine]),
        default="auto",
        show_default=True,
        help=help,
    )


def _wants_table(fmt: str, stream) -> bool:
    return fmt == "table" or (fmt == "auto" and stream.isatty())


# ----------------------------------------------------------------------------- export


@click.command(name="redheart-export")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(path_type=Path),
    help="A checkpoint step directory, a checkpoint root or a run directory (newest complete checkpoint).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The model folder to write.")
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    default=None,
    help="The run's tokenizer.json, if it moved (its sha256 must match the manifest).",
)
def export_main(checkpoint: Path, out: Path, tokenizer: Path | None) -> None:
    """Merge the stage shards of a complete checkpoint into one model folder (docs/model-format.md)."""
    from inference.export import export_checkpoint
    from redheart.model_folder import read_config

    folder = _run(export_checkpoint, checkpoint, out, tokenizer=tokenizer)
    config = read_config(folder)
    click.echo(
        f"exported step {config['source']['step']} of run {config['source']['run_id']} "
        f"({config['parameters']} parameters) -> {folder}"
    )


# ----------------------------------------------------------------------------- predict


@click.command(name="redheart-predict")
@click.option(
    "--model", "model_dir", required=True, type=click.Path(path_type=Path), help="An exported model folder."
)
@click.argument("texts", nargs=-1)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    default=None,
    help='JSONL with one {"text": ..., "id": ...} per line (after any TEXT arguments).',
)
@click.option(
    "--output", type=click.Path(path_type=Path), default=None, help="Write JSONL here instead of stdout."
)
@click.option(
    "--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N."
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@_format_option("jsonl", "stdout: a table on a terminal, JSONL otherwise.")
def predict_main(
    model_dir: Path,
    texts: tuple[str, ...],
    input_path: Path | None,
    output: Path | None,
    device: str,
    batch_size: int,
    fmt: str,
) -> None:
    """Predict emotions, Bentham circumstances, judgment and regret, with the calculus' explanation."""
    all_texts: list[str] = list(texts)
    ids: list[str | None] = [None] * len(texts)
    if input_path is not None:
        more, more_ids = _run(read_inputs, input_path)
        all_texts += more
        ids += more_ids
    if not all_texts:
        raise _Failure("nothing to predict: give TEXT arguments or --input F.jsonl")
    from inference.predictor import RedHeartModel

    model = _run(RedHeartModel.from_pretrained, model_dir, device=device)
    predictions = _run(model.predict, all_texts, ids=ids, batch_size=batch_size)
    jsonl = "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in predictions)
    if output is not None:
        _run(_atomic_write, output, jsonl)
        click.echo(f"{len(predictions)} prediction(s) -> {output}", err=True)
    elif _wants_table(fmt, sys.stdout):
        from inference.render import predictions_table

        click.echo(predictions_table(predictions))
    else:
        click.echo(jsonl, nl=False)


# ----------------------------------------------------------------------------- evaluate


@click.command(name="redheart-evaluate")
@click.option(
    "--model", "model_dir", required=True, type=click.Path(path_type=Path), help="An exported model folder."
)
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Labeled JSONL scenarios (docs/data.md).",
)
@click.option(
    "--split",
    type=click.Choice(["all", "validation", "train"]),
    default="all",
    show_default=True,
    help="all rows, or the training run's own hash split of this file.",
)
@click.option(
    "--output", type=click.Path(path_type=Path), default=None, help="Also write the JSON result here."
)
@click.option("--device", default="auto", show_default=True)
@_format_option("json", "stdout: a table on a terminal (or with --output), JSON otherwise.")
def evaluate_main(
    model_dir: Path, data_path: Path, split: str, output: Path | None, device: str, fmt: str
) -> None:
    """The training report's validation metrics, trivial and bag-of-words baselines, on any labeled file."""
    from inference.predictor import RedHeartModel
    from inference.render import evaluation_table

    model = _run(RedHeartModel.from_pretrained, model_dir, device=device)
    result: dict[str, Any] = _run(model.evaluate, data_path, split=split)
    text = json.dumps(result, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    if output is not None:
        _run(_atomic_write, output, text)
    if _wants_table(fmt, sys.stdout) or (output is not None and fmt == "auto"):
        click.echo(evaluation_table(result))
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":  # python -m inference.cli predict|export|evaluate ...
    commands = {"export": export_main, "predict": predict_main, "evaluate": evaluate_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python -m inference.cli {{{','.join(commands)}}} ...")
    name = sys.argv.pop(1)
    commands[name](prog_name=f"redheart-{name}")
