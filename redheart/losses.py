"""Multi-task losses of the heads. Used by the GPU stage and by the single-process reference.

A head whose label is missing for a sample contributes nothing for it: each head's loss is a mean
over the samples of the micro-batch that carry its label, and 0 (without a graph) when none do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from redheart.model import HEADS

__all__ = ["multitask_loss", "label_counts", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _masked_mean(
    per_sample: torch.Tensor, mask: torch.Tensor, count: int | None = None
) -> torch.Tensor | None:
    if count is None:
        count = int(mask.sum())  # a host sync when the mask lives on a GPU: pass label_counts there
    if count == 0:
        return None
    return (per_sample * mask.to(per_sample.dtype)).sum() / count


def multitask_loss(
    outputs: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    regret_target: torch.Tensor | None,
    weights: Mapping[str, float] | None = None,
    *,
    label_counts: Mapping[str, int] | None = None,
    lazy: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of head losses (a scalar with a graph) and each head's value (floats).

    label_counts: how many samples carry each head's label (see :func:`label_counts`), counted on
    the host copy of the labels, so a GPU caller never waits on the device to learn them.
    lazy: return each head's value as a detached 0-dim tensor instead of a float (no host sync
    per micro-batch; the caller reads them back once, e.g. per round).

    outputs: emotion_logits [B,6], bentham [B,8] (activated), judgment_logits [B,5], regret [B].
    labels:  labels.emotions [B,6], labels.emotions_mask [B], labels.bentham [B,8],
             labels.bentham_mask [B], labels.judgment [B] (IGNORE_INDEX where missing).
    regret_target: [B] from the regret calculus (None: no regret loss).
    """
    weights = weights or {}
    # Losses are computed in fp32 even under autocast: small per-head values and the final sum
    # lose precision in 16 bits.
    emotion_logits = outputs["emotion_logits"].float()
    bentham = outputs["bentham"].float()
    judgment_logits = outputs["judgment_logits"].float()
    parts: dict[str, torch.Tensor] = {}

    emo = F.binary_cross_entropy_with_logits(
        emotion_logits, labels["labels.emotions"].float(), reduction="none"
    ).mean(dim=1)  # [B]
    counts = label_counts or {}
    value = _masked_mean(emo, labels["labels.emotions_mask"].bool(), counts.get("emotion"))
    if value is not None:
        parts["emotion"] = value

    ben = ((bentham - labels["labels.bentham"].float()) ** 2).mean(dim=1)  # [B]
    value = _masked_mean(ben, labels["labels.bentham_mask"].bool(), counts.get("bentham"))
    if value is not None:
        parts["bentham"] = value

    judgment = labels["labels.judgment"].long()
    has_judgment = counts["judgment"] > 0 if "judgment" in counts else bool((judgment != IGNORE_INDEX).any())
    if has_judgment:
        parts["judgment"] = F.cross_entropy(judgment_logits, judgment, ignore_index=IGNORE_INDEX)

    if regret_target is not None:
        parts["regret"] = F.mse_loss(
            outputs["regret"].float(), regret_target.float().to(outputs["regret"].device)
        )

    total = None
    for head in HEADS:
        if head in parts:
            term = parts[head] * float(weights.get(head, 1.0))
            total = term if total is None else total + term
    if total is None:  # no labels at all in this micro-batch: a zero that still reaches every head
        total = sum(o.float().sum() * 0.0 for o in outputs.values())
    if lazy:
        return total, {head: v.detach() for head, v in parts.items()}  # type: ignore[misc]
    return total, {head: float(v.detach()) for head, v in parts.items()}


def label_counts(labels: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Samples carrying each head's label, from CPU label tensors (as they arrive off the wire)."""
    return {
        "emotion": int(labels["labels.emotions_mask"].bool().sum()),
        "bentham": int(labels["labels.bentham_mask"].bool().sum()),
        "judgment": int((labels["labels.judgment"].long() != IGNORE_INDEX).sum()),
    }
