"""Coordinated checkpoints: each stage writes its shard, then the orchestrator writes the manifest.

Layout::

    <checkpoint dir>/step-00000020/
        cpu/   weights.safetensors  optimizer.safetensors  rng.safetensors  stage.json
        gpu/   ...
        manifest.json      <- written last: temp file, fsync, rename, fsync of the directory

A step directory without ``manifest.json`` (a run killed while saving) does not exist for
``--resume``. After a new manifest lands, all but the newest ``keep_last`` complete checkpoints are
deleted. Nothing here uses pickle: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redheart import model_folder

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    manifest: dict[str, Any]


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    manifest = dict(manifest, format_version=FORMAT_VERSION, written_at=time.time())
    target = directory / MANIFEST
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself must survive a crash
    finally:
        os.close(fd)
    return target


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is not a complete checkpoint (no {MANIFEST}; it was probably interrupted while saving)"
        )
    if path.stat().st_size > 64 << 20:
        raise CheckpointError(f"{path} is implausibly large")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {manifest.get('format_version')!r}")
    for name in model_folder.checkpoint_stages(manifest):
        shard = model_folder.shard_directory(name)
        if not (directory / shard / "stage.json").is_file():
            raise CheckpointError(f"{directory}: the {name.replace('_', ' ')} shard ({shard}/) is missing")
    return manifest


def list_complete(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under root, oldest first. Incomplete step directories are skipped."""
    out = []
    if not root.is_dir():
        return out
    for child in sorted(root.iterdir()):
        if not child.is_dir() or not child.name.startswith("step-"):
            continue
        try:
            manifest = read_manifest(child)
        except CheckpointError:
            continue
        out.append(CheckpointInfo(child, int(manifest["step"]), manifest))
    out.sort(key=lambda c: c.step)
    return out


def latest(root: Path) -> CheckpointInfo | None:
    complete = list_complete(root)
    return complete[-1] if complete else None


def resolve(path_or_root: Path) -> CheckpointInfo:
    """--resume PATH: PATH is a step directory, or a checkpoint root / output dir (take the latest)."""
    if (path_or_root / MANIFEST).exists():
        manifest = read_manifest(path_or_root)
        return CheckpointInfo(path_or_root, int(manifest["step"]), manifest)
    for root in (path_or_root, path_or_root / "checkpoints"):
        found = latest(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint under {path_or_root}")


def prune(root: Path, keep_last: int) -> list[Path]:
    complete = list_complete(root)
    removed = []
    for info in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.path)
    return removed
