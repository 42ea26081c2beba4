"""The metrics of a stage process: the shared stage series (redheart/metrics_common.py) for one stage.

cpu_stage/metrics.py and gpu_stage/metrics.py call :func:`create_stage_metrics` with their stage
name; the GPU stage also gives its device, whose memory gauges it reads.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from redheart.metrics_common import StageMetrics
from redheart.stage.wire import STAGE_METHODS


def create_stage_metrics(registry: CollectorRegistry, stage: str, device: str | None = None) -> StageMetrics:
    metrics = StageMetrics(registry, stage=stage, methods=STAGE_METHODS)
    if device is not None:
        metrics.bind_device(device)  # the gauges read this stage's own cuda:N, not device 0
    return metrics
