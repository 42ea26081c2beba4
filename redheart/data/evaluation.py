"""Validation metrics of the heads, and the trivial baselines a trained model must beat.

Each head's metric and baseline live with the head (the registry in redheart/heads.py; the
built-in ones, with their conventions — emotion F1, the two emotion baselines — in
redheart/builtin_heads.py); this module runs them over every registered head. Each metric uses
only the rows labeled for that head (masks / ``-100``), and a metric with no labeled rows is
omitted rather than reported as NaN, so reports and Prometheus gauges never carry NaN.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from redheart import heads as head_registry
from redheart.heads import HeadSpec

__all__ = ["compute_metrics", "baseline_metrics", "bow_baseline_metrics", "compare_with_baselines"]


def _rows(labels: Mapping[str, torch.Tensor]) -> int:
    for spec in sorted(head_registry.heads(), key=lambda s: s.report_order):
        for key in spec.input_keys:
            if key in labels:
                return int(labels[key].shape[0])
    raise ValueError(f"labels has none of the expected keys; got {sorted(labels)}")


def _head_metrics(spec: HeadSpec, pred: torch.Tensor, labels: Mapping[str, torch.Tensor], n: int):
    if any(key not in labels for key in spec.input_keys):
        return {}
    return spec.metric(pred, labels, n)


def compute_metrics(pred: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of model outputs against labels, each over that head's labeled rows only.

    Args:
        pred: ``emotion_logits`` [N, 6] (raw logits), ``bentham`` [N, 8] (activated: first 7 in
            [0, 1], valence in [-1, 1]), ``judgment_logits`` [N, 5], ``regret`` [N] (every
            registered head's output). Missing keys skip their metric.
        labels: ``labels.emotions`` [N, 6], ``labels.emotions_mask`` [N], ``labels.bentham`` [N, 8],
            ``labels.bentham_mask`` [N], ``labels.judgment`` [N] (-100 = unlabeled) and optionally
            ``regret_target`` [N] (non-finite entries are treated as unlabeled).

    Returns:
        A subset of ``judgment_accuracy``, ``emotion_macro_f1``, ``bentham_mae`` (mean over rows and
        all 8 columns), ``regret_mae`` (and registered heads' metrics) — only those with at least
        one labeled row, in report order. Never NaN.
    """
    n = _rows(labels)
    out: dict[str, float] = {}
    for spec in sorted(head_registry.heads(), key=lambda s: s.report_order):
        if spec.output in pred:
            out.update(_head_metrics(spec, pred[spec.output], labels, n))
    return out


def baseline_metrics(
    train_labels: Mapping[str, torch.Tensor], val_labels: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """The metrics a label-only, text-blind predictor fitted on train gets on validation.

    Each head's baseline (redheart/builtin_heads.py for the built-in ones: judgment's majority
    class, emotion's majority and best constant, Bentham's and regret's train means) gives one or
    more constant predictions; a head with several candidates reports each as
    ``baseline_<metric>_<candidate>`` and the best on validation as ``baseline_<metric>``.

    Keys are the :func:`compute_metrics` keys prefixed ``baseline_``; heads without labeled train
    rows are omitted.
    """
    n_val = _rows(val_labels)
    out: dict[str, float] = {}
    for spec in sorted(head_registry.heads(), key=lambda s: s.report_order):
        candidates = spec.baseline(train_labels, n_val)
        if not candidates:
            continue
        scored = {name: _head_metrics(spec, pred, val_labels, n_val) for name, pred in candidates.items()}
        for metric in spec.metrics:
            values = {name: m[metric.name] for name, m in scored.items() if metric.name in m}
            if list(values) == [""]:
                out[f"baseline_{metric.name}"] = values[""]
                continue
            for name, value in values.items():
                out[f"baseline_{metric.name}_{name}"] = value
            if values:
                out[f"baseline_{metric.name}"] = (max if metric.higher else min)(values.values())
    return out


def __getattr__(name: str) -> object:
    """``METRIC_KEYS`` (the validation metric names in report order), from the head registry."""
    if name == "METRIC_KEYS":
        return head_registry.validation_metric_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def bow_baseline_metrics(
    bow, input_ids: torch.Tensor, attention_mask: torch.Tensor, val_labels: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Metrics of the bag-of-words baseline (redheart/data/bow_baseline.py) on validation rows,
    keyed ``baseline_bow_<metric>``; heads the baseline was not fitted for are omitted."""
    metrics = compute_metrics(bow.predict(input_ids, attention_mask), val_labels)
    return {f"baseline_bow_{k}": v for k, v in metrics.items()}


def compare_with_baselines(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> list[str]:
    """One sentence per metric where the model does worse than a baseline (empty: it beats them all).

    Bag-of-words first: losing to a linear model on token counts is the finding a user must see."""
    out = []
    for metric in head_registry.validation_metrics():
        key, higher = metric.name, metric.higher
        if key not in metrics:
            continue
        for prefix, name in (
            ("baseline_bow_", "the bag-of-words baseline"),
            ("baseline_", "the trivial baseline"),
        ):
            other = baseline.get(prefix + key)
            if other is None:
                continue
            if (metrics[key] < other) if higher else (metrics[key] > other):
                out.append(
                    f"{key} {metrics[key]:.4f} is worse than {name} ({other:.4f}, "
                    f"{'higher' if higher else 'lower'} is better)"
                )
                break
    return out
