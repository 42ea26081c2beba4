"""The server of a stage process: :func:`create_stage_server` and the :class:`StageServer` it returns.

The factory behind ``cpu_stage.server.create_server`` and ``gpu_stage.server.create_server``:
runtime, peer link, servicer, grpc server with health, metrics interceptor and call budget.
Returns ``(StageServer, port)``; port 0 binds a free port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from redheart.config import HybridConfig
from redheart.guard import CallBudget, add_parsing_handlers
from redheart.metrics_common import StageMetrics
from redheart.rpc import bind, make_server, set_serving
from redheart.stage.metrics import create_stage_metrics
from redheart.stage.peer_link import GrpcPeerLink
from redheart.stage.runtime import StageRuntime
from redheart.stage.servicer import StageServicer
from redheart.v1 import stage_pb2

SERVER_THREADS = 16
RESERVED_THREADS = 4
"""Server threads kept free for health checks and AbortStep (guard.CallBudget)."""
EXEMPT = ("/grpc.health.v1.Health/Check", "/redheart.v1.PipelineStage/AbortStep")


@dataclass
class StageServer:
    """A running stage service: grpc server + health + peer link. stop() drains then stops."""

    server: grpc.Server
    health: Any
    servicer: StageServicer
    link: GrpcPeerLink
    port: int
    name: str

    def stop(self, grace: float = 10.0) -> None:
        set_serving(self.health, False)
        runtime = self.servicer.runtime
        plan = runtime.current_plan
        if runtime.running.is_set() and runtime.run_id and plan is not None:
            # A RunStep waiting on its peer would otherwise hold its thread until the step deadline
            # (minutes), keeping the process alive long after the grace period.
            runtime.abort(runtime.run_id, plan.step, "the stage is shutting down")
        self.server.stop(grace).wait()
        # Every thread this stage started is stopped and joined here (the sender, the regret
        # client's pool): none may be left inside torch or grpc when the process ends.
        self.link.close()
        regret = getattr(self.servicer.runtime.part, "regret", None)
        if regret is not None:
            regret.close()
        self.servicer.runtime.close_replicas()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def create_stage_server(
    config: HybridConfig,
    *,
    stage: str,
    part_factory: Callable[[], Any],
    host: str,
    port: int,
    registry: CollectorRegistry | None = None,
    device: str = "cpu",
    layer_range: str = "",
    metrics_factory: Callable[[CollectorRegistry], StageMetrics] | None = None,
) -> tuple[StageServer, int]:
    from redheart.model import resolve_model_shape

    shape = resolve_model_shape(config.model)
    metrics = None
    if registry is not None:
        metrics = metrics_factory(registry) if metrics_factory else create_stage_metrics(registry, stage)
    runtime = StageRuntime(part_factory, shape)
    link = GrpcPeerLink(
        stage, config.wire.codec, config.wire.max_message_mb, metrics, security=config.security
    )
    servicer = StageServicer(runtime, link, config, metrics, device=device, layer_range=layer_range)
    interceptors = [metrics.grpc] if metrics is not None else []
    interceptors.append(CallBudget(SERVER_THREADS - RESERVED_THREADS, EXEMPT))
    server, health = make_server(
        max_message_mb=config.wire.max_message_mb,
        max_workers=SERVER_THREADS,
        max_concurrent_rpcs=config.wire.max_concurrent_rpcs,
        interceptors=interceptors,
        security=config.security,
    )
    add_parsing_handlers(server, servicer, stage_pb2.DESCRIPTOR.services_by_name["PipelineStage"])
    bound = bind(server, host, port, security=config.security)
    server.start()
    if metrics is not None:
        metrics.parameters.labels(stage).set(runtime.num_parameters())
    set_serving(health, True, ["redheart.v1.PipelineStage"])
    return StageServer(server, health, servicer, link, bound, stage), bound
