"""Each process's metrics, built on a fresh registry: the names the dashboard, the alert rules and
docs/metrics.md may use, and the exposition promtool checks."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from redheart.config import RegretConfig


def _orchestrator(registry: CollectorRegistry) -> None:
    from orchestrator.metrics import OrchestratorMetrics

    OrchestratorMetrics(registry)


def _cpu_stage(registry: CollectorRegistry) -> None:
    from cpu_stage.metrics import create_metrics

    create_metrics(registry)


def _gpu_stage(registry: CollectorRegistry) -> None:
    from gpu_stage.metrics import create_metrics

    create_metrics(registry)


def _regret(registry: CollectorRegistry) -> None:
    from regret_service.metrics import RegretMetrics

    RegretMetrics(registry, num_workers=RegretConfig().num_workers)


BUILDERS = {
    "orchestrator": _orchestrator,
    "cpu-stage": _cpu_stage,
    "gpu-stage": _gpu_stage,
    "regret": _regret,
}


def registry_of(process: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    BUILDERS[process](registry)
    return registry


def sample_names(process: str) -> set[str]:
    return {sample.name for family in registry_of(process).collect() for sample in family.samples}


def all_sample_names() -> set[str]:
    """Every series any process exports, plus Prometheus' own per-target `up`."""
    names = {"up"}
    for process in BUILDERS:
        names |= sample_names(process)
    return names
