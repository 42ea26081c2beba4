"""Metrics of the GPU stage process (the shared stage series with stage="gpu", GPU memory included)."""

from prometheus_client import CollectorRegistry

from redheart.metrics_common import StageMetrics
from redheart.stage.metrics import create_stage_metrics


def create_metrics(registry: CollectorRegistry, device: str = "cpu", stage: str = "gpu") -> StageMetrics:
    """``stage``: the label, "gpu" for the last stage, "gpu1" ... for the middle ones."""
    return create_stage_metrics(registry, stage, device=device)
