"""Metrics of the CPU stage process (the shared stage series with stage="cpu")."""

from prometheus_client import CollectorRegistry

from redheart.metrics_common import StageMetrics
from redheart.stage.metrics import create_stage_metrics


def create_metrics(registry: CollectorRegistry) -> StageMetrics:
    return create_stage_metrics(registry, "cpu")
