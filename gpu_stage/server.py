"""Server factory of the GPU stage: ``create_server(config, port=0) -> (server, port)``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gpu_stage.device import enforce_budget
from gpu_stage.logic import GpuStagePart, resolve_device
from gpu_stage.metrics import create_metrics
from redheart.config import HybridConfig
from redheart.model import resolve_model_shape
from redheart.stage.server import StageServer, create_stage_server


def create_server(
    config: HybridConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[StageServer, int]:
    shape = resolve_model_shape(config.model)
    g = config.gpu_stage
    device = resolve_device(g.device)  # fails early with a clear message when CUDA is asked for but absent
    # On CUDA: refuses a budget the card cannot give and caps the allocator to gpu_memory_gb.
    budget = enforce_budget(config, device)["budget_bytes"]
    return create_stage_server(
        config,
        stage="gpu",
        part_factory=lambda: GpuStagePart(
            shape,
            device=g.device,
            checkpointing=g.activation_checkpointing,
            max_message_mb=config.wire.max_message_mb,
            security=config.security,
            budget_bytes=budget,
        ),
        host=g.host if host is None else host,
        port=g.port if port is None else port,
        registry=registry,
        metrics_factory=lambda r: create_metrics(r, str(device)),
        device=str(device),
        layer_range=f"layers {shape.cpu_layers}-{shape.num_layers - 1} + heads",
    )
