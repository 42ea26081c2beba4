"""Validation of a run through the live pipeline: the metrics, the trivial and bag-of-words
baselines they are compared with, the Prometheus gauges, and (at the end) explanations.jsonl."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from orchestrator.data import PreparedData, to_batch
from orchestrator.report import write_explanations
from redheart.heads import validation_metric_names

log = logging.getLogger(__name__)


def predict(driver, data: PreparedData, batch_size: int) -> dict[str, torch.Tensor]:
    """Every head's predictions over the validation split, in its order."""
    val = data.validation
    outputs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(val), batch_size):
        indices = list(range(start, min(start + batch_size, len(val))))
        out = driver.evaluate(to_batch(val, indices))
        for k, v in out.items():
            outputs.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in outputs.items()}


def evaluate(
    config,
    driver,
    data: PreparedData,
    *,
    label: str,
    step: int,
    bow,
    regret_mean: float | None,
    metrics,
    progress=None,
    explanations_path: Path | None = None,
) -> dict[str, Any]:
    """One validation entry; `regret_mean` is the run's mean regret target so far (None: none yet)."""
    from redheart import calculus
    from redheart.data import baseline_metrics, compute_metrics
    from redheart.data.evaluation import bow_baseline_metrics, compare_with_baselines

    val = data.validation
    pred = predict(driver, data, config.train.batch_size)
    labels = dict(data.validation_labels)  # a copy: regret_target is added below
    scores = calculus.score(
        pred["bentham"].numpy(), config.regret.regrets_per_step, config.regret.bentham_per_regret
    )
    labels["regret_target"] = torch.from_numpy(scores.regret).float()
    values = compute_metrics(pred, labels)
    train_labels = dict(data.train_labels)
    if regret_mean is not None:
        train_labels["regret_target"] = torch.full((len(data.train),), regret_mean)
    baseline = baseline_metrics(train_labels, labels)
    baseline.update(bow_baseline_metrics(bow, val.input_ids, val.attention_mask, labels))
    entry = {
        "label": label,
        "step": step,
        "metrics": values,
        "baseline": baseline,
        "worse_than_baselines": compare_with_baselines(values, baseline),
    }
    if entry["worse_than_baselines"]:
        log.warning(
            "%s validation: the model does worse than a baseline: %s",
            label,
            "; ".join(entry["worse_than_baselines"]),
        )
    _set_gauges(metrics, values, baseline)
    if explanations_path is not None:
        phase = progress.phase("explanations") if progress else contextlib.nullcontext()
        with phase:
            write_explanations(explanations_path, val.ids, scores, pred)
    return entry


def _set_gauges(metrics, values: dict[str, float], baseline: dict[str, float]) -> None:
    names = validation_metric_names()
    for key, value in values.items():
        if key in names:
            metrics.validation.labels(key).set(value)
    for key, value in baseline.items():
        name = key.removeprefix("baseline_")
        if name in names:
            metrics.validation_baseline.labels(name).set(value)
