"""The learning-rate schedule of a run: linear warm-up, then cosine / linear decay to
``train.min_lr_ratio`` x the peak, or constant. The trainer, ``--verify`` and the single-process
reference all take the rate of a step from here, so they cannot drift apart."""

from __future__ import annotations

import math


def learning_rate_at(step: int, total_steps: int, train) -> float:
    """Warm-up then cosine / linear decay to min_lr_ratio x peak, or constant."""
    peak = train.learning_rate
    if train.warmup_steps and step < train.warmup_steps:
        return peak * (step + 1) / train.warmup_steps
    if train.scheduler_type == "constant":
        return peak
    span = max(1, total_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = peak * train.min_lr_ratio
    if train.scheduler_type == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
