"""The four built-in heads' data for the registry (redheart/heads.py): emotion, bentham, judgment,
regret — their activations, losses, metrics and trivial baselines, then their specs in model order.

Losses: a head whose label is missing for a sample contributes nothing for it: each head's loss is
a mean over the samples of the micro-batch that carry its label, and None (no term) when none do.

Metrics use only the rows labeled for that head (masks / ``-100``), and a metric with no labeled
rows is omitted rather than reported as NaN, so reports and Prometheus gauges never carry NaN.

Emotion F1 convention: per emotion, F1 = 2·TP / (2·TP + FP + FN) with predictions
``sigmoid(logit) > 0.5`` and targets ``>= 0.5`` (soft targets are binarised). An emotion with no
positive target AND no positive prediction among the labeled rows has undefined F1 and is left out
of the macro average (counting it as 0 would punish a correct "never"; counting it as 1 would
reward any baseline for free). If every emotion is undefined the key is omitted.

Baselines (label-only, text-blind predictors fitted on train):

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
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from redheart.data.schema import BENTHAM_KEYS, EMOTIONS, JUDGMENTS
from redheart.heads import (
    IGNORE_INDEX,
    REGRET_SERVICE,
    HeadSpec,
    MetricSpec,
    class_label,
    masked_labels,
)

_BIG_LOGIT = 20.0  # a "constant" emotion prediction as a logit: sigmoid(±20) is 0/1 for all purposes
Tensor = torch.Tensor


def masked_mean(per_sample: Tensor, mask: Tensor, count: int | None = None) -> Tensor | None:
    """Mean of ``per_sample`` [B] over the rows of ``mask`` [B]; None when there are none."""
    if count is None:
        count = int(mask.sum())  # a host sync when the mask lives on a GPU: pass label_counts there
    if count == 0:
        return None
    return (per_sample * mask.to(per_sample.dtype)).sum() / count


def check_shape(name: str, tensor: Tensor, shape: tuple[int | None, ...]) -> Tensor:
    """Shape check with a message naming the key; returns the tensor detached on CPU."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    got = tuple(tensor.shape)
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
        want = tuple("N" if w is None else w for w in shape)
        raise ValueError(f"{name} has shape {got}, expected {want}")
    return tensor.detach().cpu()


def _macro_f1(pred_pos: Tensor, target_pos: Tensor) -> float | None:
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


def mask_count(mask_key: str):
    """``count`` of a masked head: rows whose mask is set."""
    return lambda labels: int(labels[mask_key].bool().sum())


# ----------------------------------------------------------------------------- emotion


def _emotion_loss(logits: Tensor, labels: Mapping[str, Tensor], count: int | None) -> Tensor | None:
    emo = F.binary_cross_entropy_with_logits(
        logits, labels["labels.emotions"].float(), reduction="none"
    ).mean(dim=1)  # [B]
    return masked_mean(emo, labels["labels.emotions_mask"].bool(), count)


def _emotion_metric(pred: Tensor, labels: Mapping[str, Tensor], n: int) -> dict[str, float]:
    logits = check_shape("emotion_logits", pred, (n, len(EMOTIONS)))
    target = check_shape("labels.emotions", labels["labels.emotions"], (n, len(EMOTIONS)))
    keep = check_shape("labels.emotions_mask", labels["labels.emotions_mask"], (n,)).bool()
    if bool(keep.any()):
        # sigmoid(x) > 0.5  <=>  x > 0, without computing the sigmoid.
        f1 = _macro_f1(logits[keep].float() > 0, target[keep].float() >= 0.5)
        if f1 is not None:
            return {"emotion_macro_f1": f1}
    return {}


def _emotion_baseline(train: Mapping[str, Tensor], n: int) -> dict[str, Tensor] | None:
    if "labels.emotions" not in train or "labels.emotions_mask" not in train:
        return None
    keep = train["labels.emotions_mask"].detach().cpu().bool()
    target = train["labels.emotions"].detach().cpu()[keep].float() >= 0.5  # [M, 6]
    if not target.shape[0]:
        return None
    prevalence = target.double().mean(0)  # [6]
    # "Always" has F1 2p/(1+p) > 0 whenever p > 0; "never" has F1 0 (or undefined if p == 0).
    candidates = {"majority": prevalence > 0.5, "best_constant": prevalence > 0}
    return {
        name: torch.where(on, _BIG_LOGIT, -_BIG_LOGIT).float().expand(n, len(EMOTIONS))  # [N, 6]
        for name, on in candidates.items()
    }


# ----------------------------------------------------------------------------- bentham


def _bentham_activation(raw: Tensor) -> Tensor:
    # 7 circumstances live in [0, 1], valence in [-1, 1].
    return torch.cat([torch.sigmoid(raw[:, :7]), torch.tanh(raw[:, 7:])], dim=1)  # [B, 8]


def _bentham_loss(values: Tensor, labels: Mapping[str, Tensor], count: int | None) -> Tensor | None:
    ben = ((values - labels["labels.bentham"].float()) ** 2).mean(dim=1)  # [B]
    return masked_mean(ben, labels["labels.bentham_mask"].bool(), count)


def _bentham_metric(pred: Tensor, labels: Mapping[str, Tensor], n: int) -> dict[str, float]:
    values = check_shape("bentham", pred, (n, len(BENTHAM_KEYS)))
    target = check_shape("labels.bentham", labels["labels.bentham"], (n, len(BENTHAM_KEYS)))
    keep = check_shape("labels.bentham_mask", labels["labels.bentham_mask"], (n,)).bool()
    if bool(keep.any()):
        return {"bentham_mae": float((values[keep].double() - target[keep].double()).abs().mean())}
    return {}


def _bentham_baseline(train: Mapping[str, Tensor], n: int) -> dict[str, Tensor] | None:
    if "labels.bentham" not in train or "labels.bentham_mask" not in train:
        return None
    keep = train["labels.bentham_mask"].detach().cpu().bool()
    if not bool(keep.any()):
        return None
    mean = train["labels.bentham"].detach().cpu()[keep].double().mean(0).float()
    return {"": mean.float().expand(n, len(BENTHAM_KEYS))}  # [N, 8]


# ----------------------------------------------------------------------------- judgment


def _judgment_loss(logits: Tensor, labels: Mapping[str, Tensor], count: int | None) -> Tensor | None:
    judgment = labels["labels.judgment"].long()
    has_judgment = count > 0 if count is not None else bool((judgment != IGNORE_INDEX).any())
    if not has_judgment:
        return None
    return F.cross_entropy(logits, judgment, ignore_index=IGNORE_INDEX)


def _judgment_count(labels: Mapping[str, Tensor]) -> int:
    return int((labels["labels.judgment"].long() != IGNORE_INDEX).sum())


def _judgment_metric(pred: Tensor, labels: Mapping[str, Tensor], n: int) -> dict[str, float]:
    logits = check_shape("judgment_logits", pred, (n, len(JUDGMENTS)))
    target = check_shape("labels.judgment", labels["labels.judgment"], (n,)).long()
    keep = target != IGNORE_INDEX  # [N]
    if bool(keep.any()):
        correct = logits[keep].argmax(dim=1) == target[keep]
        return {"judgment_accuracy": float(correct.double().mean())}
    return {}


def _judgment_baseline(train: Mapping[str, Tensor], n: int) -> dict[str, Tensor] | None:
    if "labels.judgment" not in train:
        return None
    target = train["labels.judgment"].detach().cpu().long()
    target = target[target != IGNORE_INDEX]
    if not target.numel():
        return None
    counts = torch.bincount(target, minlength=len(JUDGMENTS))
    majority = int(counts.argmax())  # argmax returns the first maximum → lowest index on ties
    logits = torch.zeros(n, len(JUDGMENTS))  # [N, 5]
    logits[:, majority] = 1.0
    return {"": logits}


# ----------------------------------------------------------------------------- regret


def _regret_activation(raw: Tensor) -> Tensor:
    return F.softplus(raw).squeeze(-1)  # [B], regret >= 0


def _regret_loss(values: Tensor, labels: Mapping[str, Tensor], count: int | None) -> Tensor | None:
    target = labels["regret_target"]
    return F.mse_loss(values, target.float().to(values.device))


def _regret_metric(pred: Tensor, labels: Mapping[str, Tensor], n: int) -> dict[str, float]:
    values = check_shape("regret", pred, (n,))
    target = check_shape("regret_target", labels["regret_target"], (n,)).double()
    keep = torch.isfinite(target)  # non-finite targets count as unlabeled
    if bool(keep.any()):
        return {"regret_mae": float((values[keep].double() - target[keep]).abs().mean())}
    return {}


def _regret_baseline(train: Mapping[str, Tensor], n: int) -> dict[str, Tensor] | None:
    if "regret_target" not in train:
        return None
    target = train["regret_target"].detach().cpu().double()
    target = target[torch.isfinite(target)]
    if not target.numel():
        return None
    return {"": torch.full((n,), float(target.mean()))}  # [N]


def builtin_heads() -> list[HeadSpec]:
    """emotion, bentham, judgment, regret: the model's head order (parameter order, init, losses)."""
    return [
        HeadSpec(
            name="emotion",
            output="emotion_logits",
            size=len(EMOTIONS),
            kind="multi-label",
            vocabulary=EMOTIONS,
            labels=masked_labels("labels.emotions", len(EMOTIONS)),
            read=lambda s: s.emotions,
            loss=_emotion_loss,
            count=mask_count("labels.emotions_mask"),
            metrics=(MetricSpec("emotion_macro_f1", higher=True),),
            metric=_emotion_metric,
            baseline=_emotion_baseline,
            forward_order=1,
            report_order=1,
        ),
        HeadSpec(
            name="bentham",
            output="bentham",
            size=len(BENTHAM_KEYS),  # 7 circumstances in [0, 1] + valence in [-1, 1]
            kind="regression",
            vocabulary=BENTHAM_KEYS,
            activation=_bentham_activation,
            labels=masked_labels("labels.bentham", len(BENTHAM_KEYS)),
            read=lambda s: s.bentham,
            loss=_bentham_loss,
            count=mask_count("labels.bentham_mask"),
            metrics=(MetricSpec("bentham_mae", higher=False),),
            metric=_bentham_metric,
            baseline=_bentham_baseline,
            forward_order=0,
            report_order=2,
        ),
        HeadSpec(
            name="judgment",
            output="judgment_logits",
            size=len(JUDGMENTS),
            kind="class",
            vocabulary=JUDGMENTS,
            labels=(class_label("labels.judgment", len(JUDGMENTS)),),
            read=lambda s: s.judgment,
            loss=_judgment_loss,
            count=_judgment_count,
            metrics=(MetricSpec("judgment_accuracy", higher=True),),
            metric=_judgment_metric,
            baseline=_judgment_baseline,
            forward_order=2,
            report_order=0,
        ),
        HeadSpec(
            name="regret",
            output="regret",
            size=1,
            kind="scalar",
            vocabulary=("regret",),
            activation=_regret_activation,
            target=REGRET_SERVICE,
            target_key="regret_target",
            loss=_regret_loss,
            metrics=(MetricSpec("regret_mae", higher=False),),
            metric=_regret_metric,
            baseline=_regret_baseline,
            forward_order=3,
            report_order=3,
        ),
    ]
