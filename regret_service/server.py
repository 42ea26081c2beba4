"""Build and run the regret service: ``create_server(config) -> (RegretServer, port)``.

Start-up order: bind the port (so port 0 is resolved and reported early) and start gRPC with health
NOT_SERVING, then start the worker processes, then health SERVING. Shutdown is the reverse: health
NOT_SERVING first (load balancers and the orchestrator stop sending), then gRPC stops accepting and
lets in-flight calls finish within ``regret.drain_seconds``, then the workers are stopped.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry

from redheart import calculus
from redheart.codec import TensorLimits
from redheart.config import ConfigError, HybridConfig
from redheart.guard import CallBudget, add_parsing_handlers
from redheart.rpc import bind, make_server, set_serving
from redheart.v1 import regret_pb2
from regret_service.logic import WorkerPool
from regret_service.metrics import RegretMetrics
from regret_service.servicer import RegretServicer

log = logging.getLogger(__name__)

__all__ = ["RegretServer", "create_server", "SERVICE_FULL_NAME"]

SERVER_THREADS = 16
SERVICE_FULL_NAME = regret_pb2.DESCRIPTOR.services_by_name[
    "RegretService"
].full_name  # redheart.v1.RegretService


class RegretServer:
    """A started regret service: the gRPC server, its health servicer, the worker pool and metrics."""

    def __init__(
        self,
        grpc_server,
        health,
        pool: WorkerPool,
        metrics: RegretMetrics,
        servicer: RegretServicer,
        host: str,
        port: int,
        drain_seconds: float = 10.0,
    ) -> None:
        self.grpc_server = grpc_server
        self.health = health
        self.pool = pool
        self.metrics = metrics
        self.servicer = servicer
        self.registry = metrics.registry
        self.host = host
        self.port = port
        self.drain_seconds = drain_seconds
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::", "[::]") else self.host
        return f"[{host}]:{self.port}" if ":" in host and not host.startswith("[") else f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, stop gRPC letting in-flight calls finish within ``grace`` seconds
        (default: regret.drain_seconds), stop the workers. A call still running at the end of the
        drain is cancelled (its client sees it fail and retries elsewhere or later), and said so."""
        grace = self.drain_seconds if grace is None else grace
        with self._stop_lock:
            if self._stopped.is_set():
                return
            set_serving(self.health, False, [SERVICE_FULL_NAME])
            log.info(
                "regret service stopping: %d Score call(s) in flight get up to %.1f s",
                self.servicer.calls_in_flight,
                grace,
            )
            self.grpc_server.stop(grace).wait()
            # The handlers of cancelled calls are still waiting on the workers here; answered ones
            # have left Score before gRPC sent their reply.
            unanswered = self.servicer.calls_in_flight
            if unanswered:
                log.warning(
                    "regret service: the drain of %.1f s ran out with %d Score call(s) unanswered; "
                    "they were cancelled (regret.drain_seconds gives them longer)",
                    grace,
                    unanswered,
                )
            self.pool.shutdown()
            self._stopped.set()
            log.info("regret service on port %d stopped", self.port)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished (True) or ``timeout`` passed (False)."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> RegretServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop(grace=1.0)


def create_server(
    config: HybridConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    registry: CollectorRegistry | None = None,
) -> tuple[RegretServer, int]:
    """Start the regret service from ``config.regret`` (host / port override it; port 0: any free port).

    Returns once the workers are up and health is SERVING. ``registry`` defaults to a fresh
    ``CollectorRegistry`` (``server.registry``), so several servers can live in one test process.
    Raises ConfigError when the counts are impossible, OSError when the port cannot be bound.
    """
    r = config.regret
    try:
        calculus.check_counts(r.regrets_per_step, r.bentham_per_regret)
    except ValueError as exc:
        raise ConfigError(f"regret: {exc}") from None
    host = r.host if host is None else host
    port = r.port if port is None else port
    registry = CollectorRegistry() if registry is None else registry

    metrics = RegretMetrics(registry, r.num_workers)
    metrics.workers_alive.set(0)
    pool = WorkerPool(r.num_workers, r.regrets_per_step, r.bentham_per_regret, listener=metrics)
    limits = TensorLimits(max_rank=config.wire.max_rank)
    servicer = RegretServicer(
        pool,
        metrics,
        max_batch=r.max_batch,
        limits=limits,
        cache_bytes=r.cache_mb << 20,
        max_error_chars=config.wire.max_error_chars,
    )
    grpc_server, health = make_server(
        max_message_mb=config.wire.max_message_mb,
        max_workers=SERVER_THREADS,
        max_concurrent_rpcs=config.wire.max_concurrent_rpcs,
        # Threads kept free for health checks: Score calls wait on the workers.
        interceptors=[metrics.grpc, CallBudget(SERVER_THREADS - 4, ("/grpc.health.v1.Health/Check",))],
        security=config.security,
    )
    add_parsing_handlers(grpc_server, servicer, regret_pb2.DESCRIPTOR.services_by_name["RegretService"])
    set_serving(health, False, [SERVICE_FULL_NAME])
    bound = bind(grpc_server, host, port, security=config.security)
    grpc_server.start()
    try:
        pool.start()
    except BaseException:
        grpc_server.stop(0)
        raise
    set_serving(health, True, [SERVICE_FULL_NAME])
    log.info(
        "regret service SERVING on %s:%d (%d workers, %d counterfactuals x %d perspectives, max_batch %d, %s)",
        host,
        bound,
        r.num_workers,
        r.regrets_per_step,
        r.bentham_per_regret,
        r.max_batch,
        config.security.describe(),
    )
    server = RegretServer(grpc_server, health, pool, metrics, servicer, host, bound, r.drain_seconds)
    return server, bound
