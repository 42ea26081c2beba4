"""Every Prometheus metric of the regret service process, built on a registry it is given.

Names follow docs/observability conventions: ``redheart_`` prefix, base units, counters end in
``_total``, labels only from small fixed sets, every labelled child created up front so the series
exist (at zero) from the first scrape. The worker pool reports to :class:`RegretMetrics` through
the :class:`regret_service.logic.PoolListener` methods (``on_busy``, ``on_restart``, ``on_alive``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from redheart.metrics_common import RPC_BUCKETS, GrpcServerMetrics, add_process_metrics

__all__ = ["RegretMetrics", "REQUEST_OUTCOMES", "SERVICE_NAME"]

SERVICE_NAME = "regret"
REQUEST_OUTCOMES = ("scored", "cached", "invalid", "failed")
"""scored: computed; cached: an idempotent retry answered from the cache; invalid: INVALID_ARGUMENT;
failed: anything else (a worker died twice, deadline, shutdown)."""


class RegretMetrics:
    """The regret service's metrics. Pass a fresh ``CollectorRegistry`` in tests."""

    def __init__(
        self, registry: CollectorRegistry, num_workers: int, *, process_metrics: bool = True
    ) -> None:
        self.registry = registry
        self.requests = Counter(
            "redheart_regret_requests_total",
            "Score requests received, by outcome (scored, cached, invalid, failed).",
            ["outcome"],
            registry=registry,
        )
        for outcome in REQUEST_OUTCOMES:
            self.requests.labels(outcome)
        self.scored_scenarios = Counter(
            "redheart_regret_scored_scenarios_total",
            "Scenarios scored (cached retries not counted again).",
            registry=registry,
        )
        self.regret_computations = Counter(
            "redheart_regret_computations_total",
            "Counterfactual regret computations (scenarios x regrets_per_step).",
            registry=registry,
        )
        self.bentham_evaluations = Counter(
            "redheart_bentham_evaluations_total",
            "Bentham hedonic evaluations (scenarios x regrets_per_step x bentham_per_regret).",
            registry=registry,
        )
        self.in_flight = Gauge(
            "redheart_regret_requests_in_flight",
            "Score calls being handled right now.",
            registry=registry,
        )
        self.regret_mean = Gauge(
            "redheart_regret_mean",
            "Mean regret of the last scored batch.",
            registry=registry,
        )
        self.score_seconds = Histogram(
            "redheart_regret_score_seconds",
            "Time to score one batch in the worker pool (decode and encode excluded).",
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.worker_busy = Counter(
            "redheart_regret_worker_busy_seconds_total",
            "Seconds each worker process spent scoring.",
            ["worker"],
            registry=registry,
        )
        self._busy_children = [self.worker_busy.labels(str(i)) for i in range(num_workers)]
        self.workers_alive = Gauge(
            "redheart_regret_workers_alive",
            "Worker processes currently alive.",
            registry=registry,
        )
        self.worker_restarts = Counter(
            "redheart_regret_worker_restarts_total",
            "Worker processes replaced after dying.",
            registry=registry,
        )
        if process_metrics:
            add_process_metrics(registry)
        self.grpc = GrpcServerMetrics(registry, SERVICE_NAME, ["Score"])

    # ---- PoolListener

    def on_busy(self, worker: int, seconds: float) -> None:
        if 0 <= worker < len(self._busy_children):
            self._busy_children[worker].inc(max(0.0, seconds))

    def on_restart(self, worker: int) -> None:
        self.worker_restarts.inc()

    def on_alive(self, count: int) -> None:
        self.workers_alive.set(count)

    # ---- the servicer

    def observe_batch(
        self, scenarios: int, computations: int, evaluations: int, regret_mean: float | None, seconds: float
    ) -> None:
        self.requests.labels("scored").inc()
        self.scored_scenarios.inc(scenarios)
        self.regret_computations.inc(computations)
        self.bentham_evaluations.inc(evaluations)
        if regret_mean is not None:
            self.regret_mean.set(regret_mean)
        self.score_seconds.observe(seconds)
