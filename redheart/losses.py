"""Multi-task losses of the heads. Used by the GPU stage and by the single-process reference.

Each head's own loss lives with the head (redheart/heads.py registry; the built-in ones in
redheart/builtin_heads.py); this module sums them. A head whose label is missing for a sample
contributes nothing for it: each head's loss is a mean over the samples of the micro-batch that
carry its label, and no term when none do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from redheart import heads as head_registry
from redheart.heads import IGNORE_INDEX, REGRET_SERVICE

__all__ = ["multitask_loss", "label_counts", "IGNORE_INDEX"]


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

    outputs: each registered head's output (emotion_logits [B,6], bentham [B,8] (activated),
             judgment_logits [B,5], regret [B]).
    labels:  the registry's label keys (labels.emotions [B,6], labels.emotions_mask [B],
             labels.bentham [B,8], labels.bentham_mask [B], labels.judgment [B] (IGNORE_INDEX where
             missing)).
    regret_target: [B] from the regret calculus, the target of every head whose target is the
             regret service (None: no such loss).
    weights: per head; a head not named takes its spec's ``default_weight``.
    """
    weights = weights or {}
    counts = label_counts or {}
    specs = head_registry.heads()
    parts: dict[str, torch.Tensor] = {}
    for spec in specs:
        if spec.target == REGRET_SERVICE:
            if regret_target is None:
                continue
            targets: Mapping[str, torch.Tensor] = {spec.target_key: regret_target}
        else:
            targets = labels
        # Losses are computed in fp32 even under autocast: small per-head values and the final sum
        # lose precision in 16 bits.
        value = spec.loss(outputs[spec.output].float(), targets, counts.get(spec.name))
        if value is not None:
            parts[spec.name] = value

    total = None
    for spec in specs:
        if spec.name in parts:
            term = parts[spec.name] * float(weights.get(spec.name, spec.default_weight))
            total = term if total is None else total + term
    if total is None:  # no labels at all in this micro-batch: a zero that still reaches every head
        total = sum(o.float().sum() * 0.0 for o in outputs.values())
    if lazy:
        return total, {head: v.detach() for head, v in parts.items()}  # type: ignore[misc]
    return total, {head: float(v.detach()) for head, v in parts.items()}


def label_counts(labels: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Samples carrying each head's label, from CPU label tensors (as they arrive off the wire)."""
    return {spec.name: spec.count(labels) for spec in head_registry.heads() if spec.count is not None}
