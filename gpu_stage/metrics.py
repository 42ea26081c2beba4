"""Metrics of the GPU stage process (the shared stage series with stage="gpu", GPU memory included)."""

from prometheus_client import CollectorRegistry

from redheart.metrics_common import StageMetrics
from redheart.stage_service import STAGE_METHODS


def create_metrics(registry: CollectorRegistry) -> StageMetrics:
    return StageMetrics(registry, stage="gpu", methods=STAGE_METHODS)
