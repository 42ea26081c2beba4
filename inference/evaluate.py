"""redheart-evaluate: the training report's metrics and baselines for an exported model on any file.

The numbers are computed exactly as the run's validation computes them, so evaluating the run's
own validation split reproduces the report bit for bit:

* rows in file order, in micro-batches of the run's ``train.micro_batch_size``, each cut to its
  longest row rounded up to the run's ``train.pad_to_multiple_of``, as the pipeline's evaluation
  sends them (float results depend on the shapes a kernel sees at the 1e-8 level; the same shapes
  give the same bits);
* the regret target of each row is the calculus' regret of the model's own Bentham prediction;
* trivial baselines from the run's train-split labels and the bag-of-words baseline fitted on them
  (both stored with the checkpoint and exported in baselines.safetensors).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from redheart import calculus, model_folder
from redheart.data import (
    DataError,
    baseline_metrics,
    compute_metrics,
    encode_dataset,
    load_jsonl,
    split_train_validation,
)
from redheart.data.bow_baseline import read_baselines_tensors
from redheart.data.dataset import trimmed_length
from redheart.data.evaluation import bow_baseline_metrics, compare_with_baselines

if TYPE_CHECKING:
    from inference.predictor import RedHeartModel

SPLITS = ("all", "validation", "train")


def select_split(scenarios: list, config: dict[str, Any], split: str, path: Path) -> list:
    """`all` rows, or the run's own hash split of them (its max_scenarios, validation_fraction, seed)."""
    if split == "all":
        return scenarios
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    data = config.get("data") or {}
    if data.get("validation_path"):
        raise DataError(
            f"{path}: the run validated on a separate file ({data['validation_path']}), not on a split of its "
            f"training data (fix: evaluate that file with split all)"
        )
    if data.get("max_scenarios"):
        scenarios = scenarios[: int(data["max_scenarios"])]
    train, validation = split_train_validation(
        scenarios, float(data.get("validation_fraction", 0.1)), int(data.get("seed", 0))
    )
    return validation if split == "validation" else train


def evaluate_file(model: RedHeartModel, path: Path, *, split: str = "all") -> dict[str, Any]:
    scenarios = select_split(load_jsonl(path).scenarios, model.config, split, path)
    if not scenarios:
        raise DataError(f"{path}: the {split} split has no scenarios")
    data = encode_dataset(scenarios, model.tokenizer, model.shape.max_seq_len)
    evaluation = model.config.get("evaluation") or {}
    size = int(evaluation.get("micro_batch_size", 2))
    # Folders exported before length-aware batching have no pad_to_multiple_of: they padded to max_seq_len.
    multiple = int(evaluation.get("pad_to_multiple_of", 0))
    parts: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(data), size):
        width = trimmed_length(data.attention_mask[lo : lo + size], multiple)
        out = model.forward(
            data.input_ids[lo : lo + size, :width], data.attention_mask[lo : lo + size, :width]
        )  # [m, width] as the pipeline sends
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    pred = {k: torch.cat(v) for k, v in parts.items()}
    labels = data.labels(list(range(len(data))))
    scores = calculus.score(pred["bentham"].numpy(), model.regrets_per_step, model.bentham_per_regret)
    labels["regret_target"] = torch.from_numpy(scores.regret).float()
    metrics = compute_metrics(pred, labels)
    baseline: dict[str, float] = {}
    notes = []
    if model_folder.BASELINES_FILE in model.config["files"]:
        stored = load_file(
            str(model_folder.verify_file(model.folder, model.config, model_folder.BASELINES_FILE))
        )
        train_labels, bow = read_baselines_tensors(stored)
        baseline = baseline_metrics(train_labels, labels)
        if bow is not None:
            baseline.update(bow_baseline_metrics(bow, data.input_ids, data.attention_mask, labels))
    else:
        notes.append(f"{model.folder} has no {model_folder.BASELINES_FILE}: no baselines to compare with")
    return {
        "model": str(model.folder),
        "data": str(path),
        "split": split,
        "scenarios": len(data),
        "metrics": metrics,
        "baseline": baseline,
        "worse_than_baselines": compare_with_baselines(metrics, baseline),
        "notes": notes,
    }
