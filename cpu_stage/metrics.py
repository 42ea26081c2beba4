"""Metrics of the CPU stage process (the shared stage series with stage="cpu")."""

from prometheus_client import CollectorRegistry

from redheart.metrics_common import StageMetrics
from redheart.stage_service import STAGE_METHODS


def create_metrics(registry: CollectorRegistry) -> StageMetrics:
    return StageMetrics(registry, stage="cpu", methods=STAGE_METHODS)
