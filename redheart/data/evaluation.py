"""Validation metrics for the four heads, and the trivial baselines a trained model must beat.

Each metric uses only the rows labeled for that head (masks / ``-100``), and a metric with no
labeled rows is omitted rather than reported as NaN, so reports and Prometheus gauges never carry
NaN.

Emotion F1 convention: per emotion, F1 = 2·TP / (2·TP + FP + FN) with predictions
``sigmoid(logit) > 0.5`` and targets ``>= 0.5`` (soft targets are binarised). An emotion with no
positive target AND no positive prediction among the labeled rows has undefined F1 and is left out
of the macro average (counting it as 0 would punish a correct "never"; counting it as 1 would
reward any baseline for free). If every emotion is undefined the key is omitted.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from redheart.data.schema import BENTHAM_KEYS, EMOTIONS, JUDGMENTS

__all__ = ["compute_metrics", "baseline_metrics", "bow_baseline_metrics", "compare_with_baselines"]

_IGNORE = -100
_BIG_LOGIT = 20.0  # a "constant" emotion prediction as a logit: sigmoid(±20) is 0/1 for all purposes


def _check(name: str, tensor: torch.Tensor, shape: tuple[int | None, ...]) -> torch.Tensor:
    """Shape check with a message naming the key; returns the tensor detached on CPU."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    got = tuple(tensor.shape)
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
        want = tuple("N" if w is None else w for w in shape)
        raise ValueError(f"{name} has shape {got}, expected {want}")
    return tensor.detach().cpu()


def _rows(labels: Mapping[str, torch.Tensor]) -> int:
    for key in ("labels.judgment", "labels.emotions_mask", "labels.bentham_mask", "regret_target"):
        if key in labels:
            return int(labels[key].shape[0])
    raise ValueError(f"labels has none of the expected keys; got {sorted(labels)}")


def _macro_f1(pred_pos: torch.Tensor, target_pos: torch.Tensor) -> float | None:
    """Macro F1 over columns of two BoolTensors [M, 6]; None if every column is undefined."""
    tp = (pred_pos & target_pos).sum(0).double()  # [6]
    fp = (pred_pos & ~target_pos).sum(0).double()  # [6]
    fn = (~pred_pos & target_pos).sum(0).double()  # [6]
    denom = 2 * tp + fp + fn  # [6]
    defined = denom > 0
    if not bool(defined.any()):
        return None
    f1 = 2 * tp[defined] / denom[defined]
    return float(f1.mean())


def compute_metrics(pred: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Metrics of model outputs against labels, each over that head's labeled rows only.

    Args:
        pred: ``emotion_logits`` [N, 6] (raw logits), ``bentham`` [N, 8] (activated: first 7 in
            [0, 1], valence in [-1, 1]), ``judgment_logits`` [N, 5], ``regret`` [N]. Missing keys
            skip their metric.
        labels: ``labels.emotions`` [N, 6], ``labels.emotions_mask`` [N], ``labels.bentham`` [N, 8],
            ``labels.bentham_mask`` [N], ``labels.judgment`` [N] (-100 = unlabeled) and optionally
            ``regret_target`` [N] (non-finite entries are treated as unlabeled).

    Returns:
        A subset of ``judgment_accuracy``, ``emotion_macro_f1``, ``bentham_mae`` (mean over rows and
        all 8 columns), ``regret_mae`` — only those with at least one labeled row. Never NaN.
    """
    n = _rows(labels)
    out: dict[str, float] = {}

    if "judgment_logits" in pred and "labels.judgment" in labels:
        logits = _check("judgment_logits", pred["judgment_logits"], (n, len(JUDGMENTS)))
        target = _check("labels.judgment", labels["labels.judgment"], (n,)).long()
        keep = target != _IGNORE  # [N]
        if bool(keep.any()):
            correct = logits[keep].argmax(dim=1) == target[keep]
            out["judgment_accuracy"] = float(correct.double().mean())

    if "emotion_logits" in pred and "labels.emotions" in labels and "labels.emotions_mask" in labels:
        logits = _check("emotion_logits", pred["emotion_logits"], (n, len(EMOTIONS)))
        target = _check("labels.emotions", labels["labels.emotions"], (n, len(EMOTIONS)))
        keep = _check("labels.emotions_mask", labels["labels.emotions_mask"], (n,)).bool()
        if bool(keep.any()):
            # sigmoid(x) > 0.5  <=>  x > 0, without computing the sigmoid.
            f1 = _macro_f1(logits[keep].float() > 0, target[keep].float() >= 0.5)
            if f1 is not None:
                out["emotion_macro_f1"] = f1

    if "bentham" in pred and "labels.bentham" in labels and "labels.bentham_mask" in labels:
        values = _check("bentham", pred["bentham"], (n, len(BENTHAM_KEYS)))
        target = _check("labels.bentham", labels["labels.bentham"], (n, len(BENTHAM_KEYS)))
        keep = _check("labels.bentham_mask", labels["labels.bentham_mask"], (n,)).bool()
        if bool(keep.any()):
            out["bentham_mae"] = float((values[keep].double() - target[keep].double()).abs().mean())

    if "regret" in pred and "regret_target" in labels:
        values = _check("regret", pred["regret"], (n,))
        target = _check("regret_target", labels["regret_target"], (n,)).double()
        keep = torch.isfinite(target)
        if bool(keep.any()):
            out["regret_mae"] = float((values[keep].double() - target[keep]).abs().mean())
    return out


def _constant_pred(
    n: int, emotions_on: torch.Tensor, bentham: torch.Tensor, judgment: int, regret: float
) -> dict[str, torch.Tensor]:
    """Model-shaped predictions that are the same for every row."""
    judgment_logits = torch.zeros(n, len(JUDGMENTS))  # [N, 5]
    judgment_logits[:, judgment] = 1.0
    emotion_logits = (
        torch.where(emotions_on, _BIG_LOGIT, -_BIG_LOGIT).float().expand(n, len(EMOTIONS))
    )  # [N, 6]
    return {
        "judgment_logits": judgment_logits,
        "emotion_logits": emotion_logits,
        "bentham": bentham.float().expand(n, len(BENTHAM_KEYS)),  # [N, 8]
        "regret": torch.full((n,), regret),  # [N]
    }


def baseline_metrics(
    train_labels: Mapping[str, torch.Tensor], val_labels: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """The metrics a label-only, text-blind predictor fitted on train gets on validation.

    * judgment: always the most frequent train class (ties → lowest index).
    * emotions: two constant predictors, both reported, and the stronger one on validation as
      ``baseline_emotion_macro_f1``:
        - ``_majority``: predict an emotion iff it is present in > 50 % of labeled train rows
          (optimal for accuracy, but F1-blind: usually "never", F1 ≈ 0);
        - ``_best_constant``: per emotion, the constant (always / never) with the higher F1 on
          train — in practice "always" for every emotion that occurs, whose F1 is 2p / (1 + p) for
          prevalence p. This is the baseline a macro-F1 claim must beat.
      Taking the max on validation makes the reported baseline, if anything, slightly optimistic:
      a model that beats it beats every text-blind constant.
    * bentham: the train mean vector of labeled rows.
    * regret: the train mean of ``regret_target`` (if both sides have one).

    Keys are the :func:`compute_metrics` keys prefixed ``baseline_``; heads without labeled train
    rows are omitted.
    """
    n_val = _rows(val_labels)
    out: dict[str, float] = {}

    # --- judgment: majority class
    majority = 0
    has_judgment = False
    if "labels.judgment" in train_labels:
        target = train_labels["labels.judgment"].detach().cpu().long()
        target = target[target != _IGNORE]
        if target.numel():
            counts = torch.bincount(target, minlength=len(JUDGMENTS))
            majority = int(counts.argmax())  # argmax returns the first maximum → lowest index on ties
            has_judgment = True

    # --- emotions: per-emotion majority and best constant
    emo_majority = torch.zeros(len(EMOTIONS), dtype=torch.bool)
    emo_best = torch.zeros(len(EMOTIONS), dtype=torch.bool)
    has_emotions = False
    if "labels.emotions" in train_labels and "labels.emotions_mask" in train_labels:
        keep = train_labels["labels.emotions_mask"].detach().cpu().bool()
        target = train_labels["labels.emotions"].detach().cpu()[keep].float() >= 0.5  # [M, 6]
        if target.shape[0]:
            has_emotions = True
            prevalence = target.double().mean(0)  # [6]
            emo_majority = prevalence > 0.5
            # "Always" has F1 2p/(1+p) > 0 whenever p > 0; "never" has F1 0 (or undefined if p == 0).
            emo_best = prevalence > 0

    # --- bentham: train mean
    bentham_mean = torch.zeros(len(BENTHAM_KEYS))
    has_bentham = False
    if "labels.bentham" in train_labels and "labels.bentham_mask" in train_labels:
        keep = train_labels["labels.bentham_mask"].detach().cpu().bool()
        if bool(keep.any()):
            bentham_mean = train_labels["labels.bentham"].detach().cpu()[keep].double().mean(0).float()
            has_bentham = True

    # --- regret: train mean
    regret_mean = 0.0
    has_regret = False
    if "regret_target" in train_labels:
        target = train_labels["regret_target"].detach().cpu().double()
        target = target[torch.isfinite(target)]
        if target.numel():
            regret_mean = float(target.mean())
            has_regret = True

    majority_metrics = compute_metrics(
        _constant_pred(n_val, emo_majority, bentham_mean, majority, regret_mean), val_labels
    )
    best_metrics = compute_metrics(
        _constant_pred(n_val, emo_best, bentham_mean, majority, regret_mean), val_labels
    )

    if has_judgment and "judgment_accuracy" in majority_metrics:
        out["baseline_judgment_accuracy"] = majority_metrics["judgment_accuracy"]
    if has_emotions:
        candidates = {}
        if "emotion_macro_f1" in majority_metrics:
            candidates["majority"] = majority_metrics["emotion_macro_f1"]
        if "emotion_macro_f1" in best_metrics:
            candidates["best_constant"] = best_metrics["emotion_macro_f1"]
        for name, value in candidates.items():
            out[f"baseline_emotion_macro_f1_{name}"] = value
        if candidates:
            out["baseline_emotion_macro_f1"] = max(candidates.values())
    if has_bentham and "bentham_mae" in majority_metrics:
        out["baseline_bentham_mae"] = majority_metrics["bentham_mae"]
    if has_regret and "regret_mae" in majority_metrics:
        out["baseline_regret_mae"] = majority_metrics["regret_mae"]
    return out


METRIC_KEYS = ("judgment_accuracy", "emotion_macro_f1", "bentham_mae", "regret_mae")
_HIGHER_IS_BETTER = {
    "judgment_accuracy": True,
    "emotion_macro_f1": True,
    "bentham_mae": False,
    "regret_mae": False,
}


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
    for key in METRIC_KEYS:
        if key not in metrics:
            continue
        higher = _HIGHER_IS_BETTER[key]
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
