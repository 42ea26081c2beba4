"""Server factory of the CPU stage: ``create_server(config, port=0) -> (server, port)``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from cpu_stage.logic import CpuStagePart
from cpu_stage.metrics import create_metrics
from redheart.config import HybridConfig
from redheart.model import resolve_model_shape, stage_layer_ranges
from redheart.stage.server import StageServer, create_stage_server


def create_server(
    config: HybridConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[StageServer, int]:
    shape = resolve_model_shape(config.model)
    checkpointing = config.cpu_stage.activation_checkpointing
    ranges = stage_layer_ranges(config.model)
    return create_stage_server(
        config,
        stage="cpu",
        part_factory=lambda: CpuStagePart(
            shape, checkpointing=checkpointing, layers=ranges[0], num_stages=len(ranges)
        ),
        host=config.cpu_stage.host if host is None else host,
        port=config.cpu_stage.port if port is None else port,
        registry=registry,
        metrics_factory=create_metrics,
        device="cpu",
        layer_range=f"embeddings + layers 0-{shape.cpu_layers - 1}"
        if shape.cpu_layers
        else "embeddings only",
    )
