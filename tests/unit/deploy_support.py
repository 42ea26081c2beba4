"""Paths, config defaults and YAML helpers shared by the deploy/ tests (test_deploy_*.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from redheart.config import CpuStageConfig, GpuStageConfig, OrchestratorConfig, RegretConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
HYBRID_TOML = DEPLOY / "config" / "hybrid.toml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "redheart.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
METRICS_DOC = REPO / "docs" / "metrics.md"

CONFIG_PATH = "/etc/redheart/hybrid.toml"
DATA_ROOT = "/var/lib/redheart"
GRAFANA_DASHBOARDS = "/var/lib/grafana/dashboards"

# The one place that maps deployment names to config sections; every check below derives ports
# from the config dataclasses' defaults through it.
DEFAULTS = {
    "cpu-stage": (CpuStageConfig().port, CpuStageConfig().metrics_port),
    "gpu-stage": (GpuStageConfig().port, GpuStageConfig().metrics_port),
    "regret": (RegretConfig().port, RegretConfig().metrics_port),
    "orchestrator": (None, OrchestratorConfig().metrics_port),
}
SECTION = {"cpu-stage": "cpu_stage", "gpu-stage": "gpu_stage", "regret": "regret"}
COMMAND = {
    "cpu-stage": "redheart-cpu-stage",
    "gpu-stage": "redheart-gpu-stage",
    "regret": "redheart-regret",
    "orchestrator": "redheart-orchestrate",
}
PROMETHEUS_JOBS = {
    "redheart-orchestrator": "orchestrator",
    "redheart-cpu-stage": "cpu-stage",
    "redheart-gpu-stage": "gpu-stage",
    "redheart-regret": "regret",
}
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "1h",
    "${__range}": "1h",
}
REGRET_SERVICE_FAMILIES = ("redheart_regret_", "redheart_bentham_")


def _yaml(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _yaml_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])
