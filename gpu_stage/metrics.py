"""Metrics of the GPU stage process (the shared stage series with stage="gpu", GPU memory included)."""

from prometheus_client import CollectorRegistry

from redheart.metrics_common import StageMetrics
from redheart.stage_service import STAGE_METHODS


def create_metrics(registry: CollectorRegistry, device: str = "cpu") -> StageMetrics:
    metrics = StageMetrics(registry, stage="gpu", methods=STAGE_METHODS)
    metrics.bind_device(device)  # the gauges read this stage's own cuda:N, not device 0
    return metrics
