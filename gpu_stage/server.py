"""Server factory of the GPU stage: ``create_server(config, port=0) -> (server, port)``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gpu_stage.device import enforce_budget
from gpu_stage.logic import GpuStagePart, resolve_device
from gpu_stage.metrics import create_metrics
from gpu_stage.middle import MiddleStagePart
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
    g = config.gpu_stage
    ranges = stage_layer_ranges(config.model)
    num_stages = len(ranges)
    rank = g.rank or num_stages - 1  # 0: the last stage (the only GPU stage of a two-stage pipeline)
    layers = ranges[rank]
    device_name = g.device_for(rank)
    device = resolve_device(device_name)  # fails early with a clear message when CUDA is asked for but absent
    # On CUDA: refuses a budget the card cannot give and caps the allocator to gpu_memory_gb.
    budget = enforce_budget(config, device)["budget_bytes"]
    last = rank == num_stages - 1
    stage = "gpu" if last else f"gpu{rank}"

    def part():
        if not last:
            return MiddleStagePart(
                shape,
                layers,
                rank=rank,
                num_stages=num_stages,
                device=device_name,
                checkpointing=g.activation_checkpointing,
            )
        return GpuStagePart(
            shape,
            device=device_name,
            checkpointing=g.activation_checkpointing,
            max_message_mb=config.wire.max_message_mb,
            security=config.security,
            budget_bytes=budget,
            layers=layers,
            rank=rank,
            num_stages=num_stages,
        )

    return create_stage_server(
        config,
        stage=stage,
        part_factory=part,
        host=g.host if host is None else host,
        port=g.port if port is None else port,
        registry=registry,
        metrics_factory=lambda r: create_metrics(r, str(device), stage),
        device=str(device),
        layer_range=f"layers {layers.start}-{layers.stop - 1}" + (" + heads" if last else ""),
    )
