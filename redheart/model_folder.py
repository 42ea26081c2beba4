"""The exported model folder: one self-contained, pickle-free copy of a trained Red Heart model.

Layout (docs/model-format.md)::

    MODEL_DIR/
        config.json             format version, model shape, head vocabularies, regret counts,
                                sha256 of every other file, where it came from
        model.safetensors       every parameter under its global name (embeddings.token.weight,
                                layers.3.attn.qkv.weight, heads.bentham.weight, ...): the names are
                                the same at every split, so any split can load its part
        tokenizer.json          the training run's byte-level BPE tokenizer
        baselines.safetensors   (optional) train-split labels and the bag-of-words baseline fit,
                                so redheart-evaluate reports the same baselines as the run

Shared by the stages (``model.init_from``: each loads its own parameters) and by ``inference/``
(export, predict, evaluate), so it lives in the shared package and imports no service.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from redheart.model import ModelShape

FORMAT = "redheart-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
BASELINES_FILE = "baselines.safetensors"

SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "ffn_size", "vocab_size", "max_seq_len")
"""What must agree between a folder and a model that loads it (split, dropout and init seed may not)."""

MAX_CONFIG_BYTES = 16 << 20


class ModelFolderError(ValueError):
    """A model folder (or a checkpoint being exported) that cannot be used; the message names the file."""


TWO_STAGES = ("cpu_stage", "gpu_stage")
"""The stages of a checkpoint whose manifest does not list its shards (the default pipeline)."""


def shard_directory(stage_name: str) -> str:
    """Where a stage's shard lies inside a checkpoint step directory: "cpu_stage" -> "cpu",
    "gpu_stage" -> "gpu" (the last stage, with the heads), "gpu_stage_1" -> "gpu1" (a middle one)."""
    return stage_name.replace("_stage_", "").removesuffix("_stage")


def checkpoint_stages(manifest: Mapping[str, Any]) -> list[str]:
    """The stage names a checkpoint's manifest lists shards of, in pipeline order."""
    shards = manifest.get("shards")
    names = list(shards) if isinstance(shards, Mapping) and shards else list(TWO_STAGES)

    def rank(name: str) -> int:  # the CPU stage first, the middles (gpu_stage_<rank>), the last
        middle = re.fullmatch(r"gpu_stage_(\d{1,4})", name)
        return int(middle.group(1)) if middle else {"cpu_stage": 0, "gpu_stage": 1 << 20}.get(name, -1)

    return sorted(names, key=rank)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def shape_of(config: Mapping[str, Any], *, cpu_layers: int | None = None) -> ModelShape:
    """The ModelShape a folder's config.json describes (all layers in one piece unless told)."""
    model = config["model"]
    layers = int(model["num_layers"])
    return ModelShape(
        **{k: int(model[k]) for k in SHAPE_KEYS},
        cpu_layers=layers if cpu_layers is None else cpu_layers,
        dropout=float(model.get("dropout", 0.0)),
        init_seed=int(model.get("init_seed", 0)),
    )


def read_json_object(path: Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """A JSON object read with a size cap (a hostile or corrupt file cannot exhaust memory)."""
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing: {what}")
    with open(path, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ModelFolderError(f"{path} is implausibly large (over {max_bytes} bytes)")
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelFolderError(f"{path} is not a JSON object ({what})")
    return value


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a model folder, checked: format, version, shape keys, listed files present."""
    root = Path(folder)
    path = root / CONFIG_FILE
    if not root.is_dir():
        raise ModelFolderError(
            f"{root} is not a model folder (no such directory; make one with redheart-export)"
        )
    config = read_json_object(path, f"{root} is not a model folder (make one with redheart-export)")
    if config.get("format") != FORMAT:
        raise ModelFolderError(f'{path} is not a Red Heart model config ("format" is not {FORMAT!r})')
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelFolderError(
            f"{path}: unsupported format_version {config.get('format_version')!r} (this version reads {FORMAT_VERSION})"
        )
    model = config.get("model")
    if not isinstance(model, dict):
        raise ModelFolderError(f'{path} has no "model" object')
    for key in SHAPE_KEYS:
        value = model.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelFolderError(f"{path}: model.{key} = {value!r} must be a positive integer")
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files or TOKENIZER_FILE not in files:
        raise ModelFolderError(f'{path} must list {WEIGHTS_FILE} and {TOKENIZER_FILE} under "files"')
    for name, info in files.items():
        if name not in (WEIGHTS_FILE, TOKENIZER_FILE, BASELINES_FILE):
            raise ModelFolderError(f"{path} lists an unknown file {name!r}")
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise ModelFolderError(f"{path} has no sha256 for {name}")
        if not (root / name).is_file():
            raise ModelFolderError(f"{root / name} is missing (listed in {path})")
    return config


def verify_file(folder: Path, config: Mapping[str, Any], name: str) -> Path:
    """The path of a listed file after checking its sha256 against config.json."""
    path = folder / name
    if sha256_file(path) != config["files"][name]["sha256"]:
        raise ModelFolderError(
            f"{path} is corrupt: its sha256 differs from the one in {folder / CONFIG_FILE}"
        )
    return path


def check_shape(config: Mapping[str, Any], shape: ModelShape, *, where: str) -> None:
    """Refuse a folder whose model shape differs from `shape`, naming every differing key."""
    model = config["model"]
    diffs = [
        f"{k}: {model.get(k)!r} in the folder, {getattr(shape, k)!r} here"
        for k in SHAPE_KEYS
        if model.get(k) != getattr(shape, k)
    ]
    if diffs:
        raise ModelFolderError(
            f"{where} holds a model of another shape: {'; '.join(diffs)} "
            f"(fix: set the [model] section to the folder's shape)"
        )


def read_weights(
    folder: Path, config: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], *, subset: bool = False
) -> dict[str, torch.Tensor]:
    """Parameters from model.safetensors (sha256 checked), exactly `expected` by name and shape.

    With ``subset`` the file may hold more (the other stages' parameters): a stage takes its own."""
    path = verify_file(folder, config, WEIGHTS_FILE)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFolderError(f"{path} cannot be read as safetensors: {exc}") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = [] if subset else sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelFolderError(
            f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    out = {}
    for name, want in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(want) or not t.is_floating_point():
            raise ModelFolderError(
                f"{path}: {name} is {t.dtype} {tuple(t.shape)}, the model has {tuple(want)}"
            )
        out[name] = t
    return out


def load_into(
    named_parameters: Iterable[tuple[str, torch.Tensor]], tensors: Mapping[str, torch.Tensor]
) -> None:
    with torch.no_grad():
        for name, p in named_parameters:
            p.copy_(tensors[name].to(p.device, p.dtype))


def read_init_weights(spec: Any, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a stage's module takes from ``StartRun settings["init_from"]`` (model.init_from).

    ``spec`` is ``{"path": MODEL_DIR, "sha256": <of model.safetensors>}``: the sha256 the orchestrator
    saw, so a folder changed between the orchestrator's check and the stage's load is refused."""
    if (
        not isinstance(spec, Mapping)
        or not isinstance(spec.get("path"), str)
        or not isinstance(spec.get("sha256"), str)
    ):
        raise ModelFolderError(f'init_from must be {{"path": str, "sha256": str}}, got {spec!r:.200}')
    folder = Path(spec["path"])
    config = read_config(folder)
    if config["files"][WEIGHTS_FILE]["sha256"] != spec["sha256"]:
        raise ModelFolderError(
            f"{folder / WEIGHTS_FILE} changed since the orchestrator checked it (sha256 differs)"
        )
    check_shape(config, module.shape, where=str(folder))  # type: ignore[arg-type]
    expected = {n: tuple(p.shape) for n, p in module.global_named_parameters()}  # type: ignore[operator]
    return read_weights(folder, config, expected, subset=True)


def write_folder(
    out: Path,
    config: dict[str, Any],
    weights: Mapping[str, torch.Tensor],
    tokenizer: Path,
    baselines: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete folder next to `out`, then rename it into place: never a half-written one.

    An existing `out` is replaced only when it is a model folder (never some other directory)."""
    out = Path(out)
    if out.exists() and not (out / CONFIG_FILE).is_file():
        raise ModelFolderError(
            f"{out} exists and is not a model folder: refusing to replace it (fix: another --out)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS_FILE))
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        files = {
            WEIGHTS_FILE: file_entry(tmp / WEIGHTS_FILE),
            TOKENIZER_FILE: file_entry(tmp / TOKENIZER_FILE),
        }
        if baselines is not None:
            save_file(dict(baselines), str(tmp / BASELINES_FILE))
            files[BASELINES_FILE] = file_entry(tmp / BASELINES_FILE)
        config = dict(config, format=FORMAT, format_version=FORMAT_VERSION, files=files)
        (tmp / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8"
        )
        # mkdtemp makes the folder private (0700); a model folder is meant to be shared like any output.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name in (*files, CONFIG_FILE):
            os.chmod(tmp / name, 0o666 & ~umask)
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
