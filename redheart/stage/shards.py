"""The checkpoint shard format of one stage: a directory with three safetensors files (weights,
optimizer state, RNG state) and ``stage.json`` (who wrote it, the optimizer's numbers, and the size
and sha256 of each file). No pickle anywhere: a shard is an untrusted file, so the readers here
check everything (sizes capped, sha256, names, shapes, types) before the stage uses any of it.

Writing is atomic per file (temporary file, fsync, rename). What a stage puts in and takes out of
a shard is in redheart/stage/state_io.py."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from redheart.stage.checks import MAX_STEP, is_real, short
from redheart.stage.errors import ErrorKind, StageError

SHARD_FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")


# ----------------------------------------------------------------------------- writing


def write_stage_json(out: Path, meta: dict[str, Any], start: float) -> dict[str, Any]:
    """Record the size and sha256 of the shard's files (already written) in ``stage.json``, written
    last: a shard without it is incomplete. Returns what SaveState answers."""
    total = 0
    for f in SHARD_FILES:
        data = (out / f).read_bytes()
        total += len(data)
        meta["files"][f] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_text(out / "stage.json", json.dumps(meta, indent=2, sort_keys=True))
    return {
        "files": [str(out / f) for f in (*SHARD_FILES, "stage.json")],
        "bytes": total,
        "seconds": time.perf_counter() - start,
        "sha256": meta["files"]["weights.safetensors"]["sha256"],
    }


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


def _bad(src: Path, what: str) -> StageError:
    return StageError(ErrorKind.PRECONDITION, f"checkpoint {short(src)}: {what}")


def read_meta(
    src: Path, step: int, max_bytes: int, fingerprint: str, model_settings: dict[str, Any]
) -> dict[str, Any]:
    """``stage.json``, checked against the model (``fingerprint``) and the requested step, and every
    file it lists checked against its sha256 (each read up to ``max_bytes``)."""
    meta_path = src / "stage.json"
    if not meta_path.is_file():
        raise StageError(ErrorKind.PRECONDITION, f"no stage shard at {short(src)} (missing stage.json)")
    meta = json.loads(read_capped(meta_path, 16 << 20))
    if not isinstance(meta, dict):
        raise _bad(src, "stage.json is not a JSON object")
    if meta.get("model_fingerprint") != fingerprint:
        from redheart.config import diff_settings

        theirs = meta.get("model_settings")
        diffs = diff_settings(model_settings, theirs) if isinstance(theirs, dict) else ["no model_settings"]
        raise StageError(
            ErrorKind.PRECONDITION,
            f"checkpoint {short(src)} was written by a different model: {'; '.join(diffs)}",
        )
    saved_step = meta.get("step")
    if type(saved_step) is not int or saved_step != step or not 0 <= step <= MAX_STEP:
        raise StageError(
            ErrorKind.PRECONDITION, f"checkpoint {short(src)} holds step {saved_step!r}, not {step}"
        )
    if not isinstance(meta.get("run_id", ""), str):
        raise _bad(src, "run_id is not a string")
    files = meta.get("files")
    if not isinstance(files, dict) or set(files) != set(SHARD_FILES):
        raise _bad(src, f"stage.json must list exactly the files {list(SHARD_FILES)}")
    for f in SHARD_FILES:
        info = files[f]
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            raise _bad(src, f"stage.json has no sha256 for {f}")
        path = src / f
        if not path.is_file():  # follows links; devices, FIFOs and directories are refused
            raise _bad(src, f"{f} is missing or not a regular file")
        if sha256_capped(path, max_bytes) != info["sha256"]:
            raise StageError(
                ErrorKind.PRECONDITION, f"checkpoint file {short(path)} is corrupt (sha256 mismatch)"
            )
    return meta


def read_weights(src: Path, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights, by global name: exactly the parameters in ``params``, floating point, same shapes."""
    weights = load_file(str(src / "weights.safetensors"))
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise _bad(src, f"missing {missing[:5]} unexpected {unexpected[:5]}")
    for name, p in params.items():
        if weights[name].shape != p.shape or not weights[name].is_floating_point():
            raise _bad(
                src,
                f"{name} is {weights[name].dtype} {tuple(weights[name].shape)}, the model has {p.dtype} {tuple(p.shape)}",
            )
    return weights


def read_optimizer_state(
    src: Path, opt_meta: Any, params: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's per-parameter state (step, exp_avg, exp_avg_sq) by global name; ``opt_meta`` is the
    ``optimizer`` section of ``stage.json``."""
    if (
        not isinstance(opt_meta, dict)
        or not isinstance(opt_meta.get("steps"), dict)
        or not isinstance(opt_meta.get("param_groups"), list)
    ):
        raise _bad(src, "stage.json has no valid optimizer section")
    opt_tensors = load_file(str(src / "optimizer.safetensors"))
    opt_state: dict[str, dict[str, torch.Tensor]] = {}
    for name, step_value in opt_meta["steps"].items():
        if name not in params:
            raise _bad(src, f"optimizer state for unknown parameter {name!r}")
        if not is_real(step_value):
            raise _bad(src, f"optimizer step of {name} is {step_value!r}, not a finite number")
        state = {"step": torch.tensor(float(step_value), dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq"):
            t = opt_tensors.get(f"{name}::{key}")
            if t is not None:
                if t.shape != params[name].shape or not t.is_floating_point():
                    raise _bad(
                        src,
                        f"optimizer {key} of {name} is {t.dtype} {tuple(t.shape)}, the parameter is {tuple(params[name].shape)}",
                    )
                state[key] = t
        opt_state[name] = state
    return opt_state


def read_param_groups(src: Path, saved_groups: list, template: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved optimizer parameter groups' numbers, checked against the groups the stage builds
    (``template``): same count, and each value of the type the built group has."""
    groups = []
    if len(saved_groups) != len(template):
        raise _bad(src, f"{len(saved_groups)} optimizer parameter groups, the stage has {len(template)}")
    for saved, current in zip(saved_groups, template):
        if not isinstance(saved, dict):
            raise _bad(src, "an optimizer parameter group is not a JSON object")
        restored: dict[str, Any] = {}
        for k, v in saved.items():
            cur = current.get(k)
            if k == "betas":
                if not (isinstance(v, list) and len(v) == 2 and all(is_real(b) for b in v)):
                    raise _bad(src, f"optimizer betas {v!r} are not two numbers")
                restored[k] = tuple(float(b) for b in v)
            elif isinstance(cur, bool):
                if not isinstance(v, bool):
                    raise _bad(src, f"optimizer {k} = {v!r} is not a boolean")
                restored[k] = v
            elif isinstance(cur, (int, float)):
                if not is_real(v):
                    raise _bad(src, f"optimizer {k} = {v!r} is not a finite number")
                restored[k] = v
            # other keys (None-valued constructor options) are the same for every run: kept as built
        groups.append(restored)
    return groups


def read_rng(src: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states; the CUDA one is checked only where the reading stage runs on CUDA."""
    rng = load_file(str(src / "rng.safetensors"))
    reference = torch.get_rng_state()
    cpu_state = rng.get("torch_cpu")
    if cpu_state is None or cpu_state.dtype != torch.uint8 or cpu_state.shape != reference.shape:
        raise _bad(src, "rng.safetensors has no valid torch_cpu state")
    if "torch_cuda" in rng and device.type == "cuda":
        cuda_ref = torch.cuda.get_rng_state(device)
        if rng["torch_cuda"].dtype != torch.uint8 or rng["torch_cuda"].shape != cuda_ref.shape:
            raise _bad(src, "rng.safetensors has no valid torch_cuda state")
    return rng


def sha256_capped(path: Path, max_bytes: int) -> str:
    digest = hashlib.sha256()
    total = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise StageError(
                    ErrorKind.PRECONDITION,
                    f"{short(path)} is above the load cap of {max_bytes} bytes (checkpoint.max_load_mb)",
                )
            digest.update(chunk)
    return digest.hexdigest()


def read_capped(path: Path, max_bytes: int) -> bytes:
    # Read at most max_bytes + 1: st_size can lie (procfs, devices), the read cannot.
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise StageError(
            ErrorKind.PRECONDITION,
            f"{short(path)} is above the load cap of {max_bytes} bytes (checkpoint.max_load_mb)",
        )
    return data
