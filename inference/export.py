"""redheart-export: merge the stage shards of a complete checkpoint into one model folder.

Everything is checked before anything is written: the manifest (a step without one does not
exist), each shard's stage.json, the sha256 of each weights file against both its stage.json and
the manifest, that every shard belongs to the manifest's run, step and model, that together they
hold every parameter of the unsplit model exactly once, and the tokenizer's sha256. The folder is
then written next to its destination and renamed into place (redheart/model_folder.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from redheart import calculus, model_folder
from redheart.heads import heads
from redheart.model import CpuStageModule, GpuStageModule, ModelShape, count_parameters
from redheart.model_folder import ModelFolderError, sha256_file

MANIFEST = "manifest.json"
STAGES = tuple(model_folder.shard_directory(n) for n in model_folder.TWO_STAGES)  # ("cpu", "gpu")
MAX_JSON_BYTES = 64 << 20


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return model_folder.read_json_object(path, what, MAX_JSON_BYTES)


def find_checkpoint(path: Path) -> Path:
    """A step directory; a run directory or checkpoint root means its newest complete checkpoint."""
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise ModelFolderError(f"checkpoint {path} does not exist")
    if path.name.startswith("step-") or any((path / s / "stage.json").exists() for s in STAGES):
        raise ModelFolderError(
            f"{path / MANIFEST} is missing: {path} is not a complete checkpoint "
            f"(the run was probably interrupted while saving; use an earlier step)"
        )
    for root in (path, path / "checkpoints"):
        steps = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file()) if root.is_dir() else []
        if steps:
            return steps[-1]
    raise ModelFolderError(f"no complete checkpoint (a step-N directory with {MANIFEST}) under {path}")


def full_model_parameters(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Global name -> shape of every parameter of the unsplit model (built once, on CPU)."""
    whole = ModelShape(**{**shape.__dict__, "cpu_layers": shape.num_layers})
    out = {n: tuple(p.shape) for n, p in CpuStageModule(whole).global_named_parameters()}
    out.update({n: tuple(p.shape) for n, p in GpuStageModule(whole).global_named_parameters()})
    return out


def _shape_from(settings: Any, where: Path) -> ModelShape:
    ints = model_folder.SHAPE_KEYS + ("cpu_layers", "init_seed")
    if (
        not isinstance(settings, dict)
        or set(settings) != set(ints) | {"dropout"}
        or not all(type(settings[k]) is int and settings[k] >= 0 for k in ints)
        or not isinstance(settings["dropout"], (int, float))
    ):
        raise ModelFolderError(f"{where}: model_settings {settings!r:.200} do not describe a model")
    return ModelShape(**settings)


def _read_shard(
    directory: Path, name: str, manifest: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], ModelShape]:
    """The weights and model shape of stage ``name``'s shard ("cpu_stage", "gpu_stage_1", ...)."""
    shard = directory / model_folder.shard_directory(name)
    meta = _read_json(shard / "stage.json", f"the {name.replace('_', ' ')} shard is incomplete")
    for key in ("run_id", "step", "model_fingerprint"):
        if meta.get(key) != manifest.get(key):
            raise ModelFolderError(
                f"{shard / 'stage.json'}: {key} {meta.get(key)!r} differs from the manifest's "
                f"{manifest.get(key)!r} (a shard of another run or step)"
            )
    weights = shard / "weights.safetensors"
    if not weights.is_file():
        raise ModelFolderError(f"{weights} is missing")
    listed = (meta.get("files") or {}).get("weights.safetensors") or {}
    actual = sha256_file(weights)
    if actual != listed.get("sha256"):
        raise ModelFolderError(
            f"{weights} is corrupt: sha256 {actual[:16]}... differs from {shard / 'stage.json'}"
        )
    in_manifest = ((manifest.get("shards") or {}).get(name) or {}).get("sha256")
    if in_manifest is not None and in_manifest != actual:
        raise ModelFolderError(f"{weights} is not the file {directory / MANIFEST} recorded (sha256 differs)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFolderError(f"{weights} cannot be read as safetensors: {exc}") from None
    return tensors, _shape_from(meta.get("model_settings"), shard / "stage.json")


def _tokenizer(directory: Path, manifest: dict[str, Any], override: Path | None) -> Path:
    """The run's tokenizer: as recorded, else next to the run's checkpoints; sha256 must match."""
    want = manifest.get("tokenizer_sha256")
    recorded = Path(str(manifest.get("tokenizer", "")))
    candidates = (
        [override] if override is not None else [recorded, directory.parent.parent / "tokenizer.json"]
    )
    for path in candidates:
        if path is not None and path.is_file():
            if want is not None and sha256_file(path) != want:
                raise ModelFolderError(
                    f"tokenizer {path} differs from the one {directory / MANIFEST} was trained with "
                    f"(sha256 mismatch)"
                )
            return path
    raise ModelFolderError(
        f"the run's tokenizer {recorded} is gone (fix: --tokenizer PATH to the run's tokenizer.json)"
    )


def _baselines(directory: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    entry = manifest.get("baselines")
    if not isinstance(entry, dict):
        return None  # a checkpoint from before baselines were saved: evaluate says so
    path = directory / str(entry.get("file", model_folder.BASELINES_FILE))
    if not path.is_file():
        raise ModelFolderError(f"{path} is missing (listed in {directory / MANIFEST})")
    if sha256_file(path) != entry.get("sha256"):
        raise ModelFolderError(f"{path} is corrupt (sha256 differs from {directory / MANIFEST})")
    return load_file(str(path))


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, *, tokenizer: str | Path | None = None
) -> Path:
    """Checkpoint (step dir, checkpoint root or run dir) -> model folder at `out`; returns `out`."""
    directory = find_checkpoint(Path(checkpoint))
    manifest = _read_json(directory / MANIFEST, "not a complete checkpoint")
    weights: dict[str, torch.Tensor] = {}
    shapes = []
    for name in model_folder.checkpoint_stages(manifest):
        tensors, shape = _read_shard(directory, name, manifest)
        twice = sorted(set(tensors) & set(weights))
        if twice:
            shard = model_folder.shard_directory(name)
            raise ModelFolderError(
                f"{directory / shard / 'weights.safetensors'} repeats parameters of another shard: {twice[:5]}"
            )
        weights.update(tensors)
        shapes.append(shape)
    shape = shapes[0]
    if any(s != shape for s in shapes[1:]):
        raise ModelFolderError(f"{directory}: the stage shards were written by different models")
    expected = full_model_parameters(shape)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ModelFolderError(
            f"{directory}: the shards do not make up the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, want in expected.items():
        if tuple(weights[name].shape) != want:
            raise ModelFolderError(
                f"{directory}: {name} is {tuple(weights[name].shape)}, the model has {want}"
            )
    tok = _tokenizer(directory, manifest, Path(tokenizer) if tokenizer is not None else None)
    run_config = manifest.get("config") or {}
    regret = run_config.get("regret") or {}
    train = run_config.get("train") or {}
    data = run_config.get("data") or {}
    config = {
        "model": {k: getattr(shape, k) for k in model_folder.SHAPE_KEYS + ("dropout", "init_seed")},
        "trained_split": {"cpu_layers": shape.cpu_layers},
        "parameters": count_parameters(shape)["total"],
        "heads": {spec.name: {"kind": spec.kind, "labels": list(spec.vocabulary)} for spec in heads()},
        "regret": {
            "regrets_per_step": int(regret.get("regrets_per_step", 7)),
            "bentham_per_regret": int(regret.get("bentham_per_regret", 3)),
            "counterfactuals": list(calculus.COUNTERFACTUALS),
            "perspectives": list(calculus.PERSPECTIVES),
        },
        # How the run laid out validation batches, so redheart-evaluate reproduces its numbers bit for bit.
        "evaluation": {
            "micro_batch_size": int(train.get("micro_batch_size", 2)),
            "pad_to_multiple_of": int(train.get("pad_to_multiple_of", 0)),
        },
        "data": {
            k: data.get(k)
            for k in ("path", "validation_path", "validation_fraction", "seed", "max_scenarios")
        },
        "source": {
            "checkpoint": str(directory.resolve()),
            "run_id": manifest.get("run_id"),
            "step": manifest.get("step"),
            "model_fingerprint": manifest.get("model_fingerprint"),
        },
    }
    return model_folder.write_folder(
        Path(out), config, {n: weights[n] for n in expected}, tok, _baselines(directory, manifest)
    )
