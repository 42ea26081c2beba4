"""The trainer's side of checkpoints: which one a run resumes from or recovers to, and the
manifest it writes after every stage saved its shard (the format is :mod:`orchestrator.checkpoint`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import checkpoint as ckpt
from orchestrator.service_set import RunError
from redheart.config import HybridConfig, diff_settings


def resume_point(resume, root: Path, config: HybridConfig) -> tuple[ckpt.CheckpointInfo | None, HybridConfig]:
    """The checkpoint `--resume` names (True / "latest": the newest under `root`) and the config to
    resume it with; RunError when there is none or it was trained with other model settings."""
    if not resume:
        return None, config
    try:
        if resume is True or resume == "latest":
            info = ckpt.latest(root)
            if info is None:
                raise RunError(f"--resume: no complete checkpoint under {root}")
        else:
            info = ckpt.resolve(Path(str(resume)))
    except ckpt.CheckpointError as exc:
        raise RunError(f"--resume: {exc}") from None
    saved_model = info.manifest.get("config", {}).get("model", {})
    if (
        config.model.gpu_layers_ratio == "auto"
        and config.model.cpu_layers is None
        and saved_model.get("cpu_layers") is not None
    ):
        # Keep the split the run was started with; re-measuring could choose another one.
        config = config.replace(**{"model.cpu_layers": saved_model["cpu_layers"]})
    if info.manifest.get("model_fingerprint") != config.model_fingerprint():
        theirs = info.manifest.get("config", {}).get("model", {})
        mine = config.to_dict()["model"]
        raise RunError(
            f"--resume: checkpoint {info.path} was trained with different model settings: "
            f"{'; '.join(diff_settings(mine, theirs)) or 'resolved shape differs'}"
        )
    return info, config


def last_complete(
    last_info: ckpt.CheckpointInfo | None, root: Path, run_id: str
) -> ckpt.CheckpointInfo | None:
    """Where a recovery goes back to: the newer of the one saved or resumed from last and the
    newest complete checkpoint of this run under `root`."""
    candidates = []
    if last_info is not None:
        try:  # the one we saved or resumed from last; --resume may name one outside checkpoint_dir
            candidates.append(ckpt.resolve(last_info.path))
        except ckpt.CheckpointError:
            pass
    latest = ckpt.latest(root)
    if latest is not None and latest.manifest.get("run_id") == run_id:
        candidates.append(latest)
    return max(candidates, key=lambda c: c.step) if candidates else None


def manifest(trainer, run_id: str, step: int, batches, driver, data, shards) -> dict[str, Any]:
    """manifest.json of a checkpoint (the baselines entry is added once their file is written)."""
    t = trainer
    epoch, offset = batches.position(step)
    return {
        "run_id": run_id,
        "step": step,
        "epoch": epoch,
        "step_in_epoch": offset,
        "model_fingerprint": t.config.model_fingerprint(),
        "config": t.config.to_dict(),
        "tokenizer": str(data.tokenizer_path),
        "tokenizer_sha256": data.tokenizer_sha256,
        "loss_scale": driver.scaler.state(),
        "shards": {
            n: {"sha256": s.sha256, "bytes": s.bytes, "files": list(s.files)} for n, s in shards.items()
        },
        **t.tally.manifest_fields(),
        "restarts": t.restarts,
    }
