"""A complete checkpoint without training: both real stage runtimes save their shards at step 0 and
the orchestrator's manifest writer seals it, exactly as a run does (for the export/predict tests
that need a checkpoint but not a trained model)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from cpu_stage.logic import CpuStagePart
from gpu_stage.logic import GpuStagePart
from orchestrator import checkpoint as ckpt
from redheart.config import HybridConfig
from redheart.data import load_jsonl, train_tokenizer
from redheart.model import resolve_model_shape
from redheart.stage.runtime import StageRuntime

MODEL = {
    "preset": "custom",
    "hidden_size": 32,
    "num_layers": 3,
    "num_heads": 2,
    "ffn_size": 64,
    "vocab_size": 512,
    "max_seq_len": 32,
    "cpu_layers": 1,
}


def make_checkpoint(root: Path, corpus: Path, *, model: dict | None = None) -> Path:
    """root/run/checkpoints/step-00000000 (+ root/run/tokenizer.json); returns the step directory."""
    config = HybridConfig(
        model=model or MODEL,
        data={"path": str(corpus)},
        regret={"enabled": False},
        orchestrator={"output_dir": str(root / "run")},
    )
    shape = resolve_model_shape(config.model)
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = run_dir / "tokenizer.json"
    train_tokenizer((s.text for s in load_jsonl(corpus).scenarios[:200]), shape.vocab_size, tokenizer)
    directory = ckpt.step_dir(run_dir / "checkpoints", 0)
    directory.mkdir(parents=True)
    settings = {"train": {}, "regret": {"enabled": False}}
    shards = {}
    for name, factory in (
        ("cpu_stage", lambda: CpuStagePart(shape)),
        ("gpu_stage", lambda: GpuStagePart(shape, device="cpu")),
    ):
        runtime = StageRuntime(factory, shape)
        runtime.start_run("run-fixture", settings, reinitialize=True, first_step=0, regret_address="")
        saved = runtime.save("run-fixture", 0, directory / name.split("_")[0])
        shards[name] = {"sha256": saved["sha256"], "bytes": saved["bytes"], "files": saved["files"]}
    ckpt.write_manifest(
        directory,
        {
            "run_id": "run-fixture",
            "step": 0,
            "model_fingerprint": config.model_fingerprint(),
            "config": config.to_dict(),
            "tokenizer": str(tokenizer),
            "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
            "shards": shards,
        },
    )
    return directory


def copy_checkpoint(step_dir: Path, dest: Path) -> Path:
    """A copy of the run directory (so the tokenizer next to the checkpoints comes along)."""
    run = step_dir.parents[1]
    shutil.copytree(run, dest)
    return dest / step_dir.relative_to(run)
