"""deploy/ is parsed for real and checked against the code it deploys: the observability files.

This file: parsing, metric names, Prometheus and Grafana; compose, Kubernetes and the image are in
test_deploy_services.py (shared paths and defaults in deploy_support.py).

* every YAML file (compose, Kubernetes multi-document files, Prometheus, Grafana provisioning) and
  the dashboard JSON parse;
* ports in compose, the Kubernetes Services/containers/probes and the Prometheus targets equal the
  defaults of redheart/config/, and deploy/config/hybrid.toml loads with load_config;
* the config is mounted at the same path in every compose service and every Kubernetes container,
  and the ConfigMap carries exactly deploy/config/hybrid.toml;
* every metric name in the dashboard and the alert rules is one the processes really export
  (collected from fresh registries of the orchestrator, both stages and the regret service);
* docs/metrics.md documents every metric family.
"""

from __future__ import annotations

import json
import re

import pytest
from deploy_support import (
    ALERTS,
    DASHBOARD,
    DEFAULTS,
    DEPLOY,
    GRAFANA_DASHBOARDS,
    GRAFANA_VARIABLES,
    METRICS_DOC,
    PROMETHEUS_JOBS,
    REGRET_SERVICE_FAMILIES,
    _yaml,
    _yaml_all,
)
from process_metrics import all_sample_names, sample_names

# ----------------------------------------------------------------------------- parsing


def test_every_yaml_file_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    expected = {
        "compose.yaml",
        "prometheus.yml",
        "prometheus-compose.yml",
        "alerts.yml",
        "kustomization.yaml",
        "namespace.yaml",
        "configmap.yaml",
    }
    assert expected <= {p.name for p in files}, f"missing: {expected - {p.name for p in files}}"
    for path in files:
        docs = _yaml_all(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: a document is not a mapping"


def test_dashboard_json_is_a_provisionable_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert 36 <= dashboard["schemaVersion"] <= 41
    datasource_uid = _provisioned_datasource()["uid"]
    ids = []
    for panel in _panels(dashboard):
        ids.append(panel["id"])
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"panel {panel['title']!r} sticks out of the grid"
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource_uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r} repeats a refId"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == datasource_uid
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            exprs.append(expr)
    return exprs


def _alert_expressions() -> list[str]:
    return [rule["expr"] for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def test_dashboard_covers_the_required_views() -> None:
    used = set().union(*(promql_metric_names(e) for e in _dashboard_expressions()))
    required = {
        "redheart_train_step_duration_seconds_bucket",
        "redheart_train_samples_total",
        "redheart_train_tokens_total",
        "redheart_train_loss",
        "redheart_validation_metric",
        "redheart_validation_baseline",
        "redheart_train_regret_mean",
        "redheart_regret_mean",
        "redheart_train_regret_computations_total",
        "redheart_regret_computations_total",
        "redheart_stage_forward_seconds_sum",
        "redheart_stage_backward_seconds_sum",
        "redheart_pipeline_bubble_ratio",
        "redheart_wire_bytes_total",
        "redheart_wire_serialize_seconds_total",
        "redheart_regret_score_seconds_bucket",
        "redheart_regret_worker_busy_seconds_total",
        "redheart_gpu_memory_allocated_bytes",
        "redheart_gpu_memory_reserved_bytes",
        "redheart_gpu_memory_peak_bytes",
        "redheart_process_resident_memory_bytes",
        "redheart_process_cpu_seconds_total",
        "redheart_grpc_server_handled_total",
    }
    assert required <= used, f"the dashboard has no panel for {sorted(required - used)}"


# ----------------------------------------------------------------------------- metric names


_FUNCTION_OR_KEYWORD = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects.

    Strings, label matchers, ranges and grouping clauses are removed first; an identifier then is a
    metric name unless it is a function / aggregation (followed by "("), a keyword, or part of a
    number / duration.
    """
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)
    s = re.sub(r"\[[^\[\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = match.group(0)
        if s[match.end() :].lstrip().startswith("("):
            continue
        if token.lower() in _FUNCTION_OR_KEYWORD:
            continue
        names.add(token)
    # A selector written only as {__name__="..."}.
    names |= set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    return names


def test_promql_metric_names_extracts_what_it_should() -> None:
    # The checker below is only as good as this extraction: make sure it finds names and ignores
    # functions, labels, durations and keywords.
    assert promql_metric_names(
        'histogram_quantile(0.9, sum by (stage, le) (rate(redheart_stage_round_seconds_bucket{stage="cpu"}[1m])))'
    ) == {"redheart_stage_round_seconds_bucket"}
    assert promql_metric_names("(time() - a_b) and (a_b > 0) or on(job) c offset 5m") == {"a_b", "c"}
    assert promql_metric_names('sum(rate(x_total{code!="OK"}[5m])) / sum(rate(x_total[5m])) > 1e-3') == {
        "x_total"
    }
    assert promql_metric_names('up{job=~"redheart-.*"} == 0') == {"up"}
    assert promql_metric_names("increase(redheart_typo_total[10m]) == 0") == {"redheart_typo_total"}


def _used_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", _dashboard_expressions()), ("alerts.yml", _alert_expressions())):
        for expr in exprs:
            for name in promql_metric_names(expr):
                used.setdefault(name, set()).add(where)
    return used


def _is_regret_service_name(name: str) -> bool:
    return name.startswith(REGRET_SERVICE_FAMILIES)


def test_every_metric_in_dashboard_and_alerts_exists() -> None:
    known = all_sample_names()
    used = _used_names()
    missing = {n: sorted(w) for n, w in used.items() if n not in known}
    assert not missing, f"metric names that no process exports: {missing}"
    assert len(used) > 30, "suspiciously few metric names found in the dashboard and alerts"
    assert any(_is_regret_service_name(n) for n in used), "the dashboard shows nothing of the regret service"
    # The regret service's gRPC series carry service="regret".
    assert "redheart_grpc_server_handled_total" in sample_names("regret")


def test_metrics_reference_documents_every_family() -> None:
    text = METRICS_DOC.read_text(encoding="utf-8")
    names = all_sample_names()
    families = {re.sub(r"_(created|bucket|sum|count)$", "", n) for n in names} - {"up"}
    undocumented = sorted(f for f in families if f not in text)
    assert not undocumented, f"docs/metrics.md does not mention {undocumented}"


# ----------------------------------------------------------------------------- prometheus


@pytest.mark.parametrize(
    "name, host_of",
    [
        ("prometheus.yml", lambda service: "127.0.0.1"),
        ("prometheus-compose.yml", lambda service: service),
    ],
)
def test_prometheus_targets_are_the_default_metrics_ports(name: str, host_of) -> None:
    config = _yaml(DEPLOY / "prometheus" / name)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(PROMETHEUS_JOBS), f"{name}: jobs {sorted(jobs)}"
    for job_name, service in PROMETHEUS_JOBS.items():
        targets = [t for sc in jobs[job_name]["static_configs"] for t in sc["targets"]]
        assert targets == [f"{host_of(service)}:{DEFAULTS[service][1]}"], (
            f"{name}: {job_name} targets {targets}"
        )
    assert config["rule_files"] == ["alerts.yml"]
    assert (DEPLOY / "prometheus" / "alerts.yml").is_file()
    interval = config["global"]["scrape_interval"]
    assert re.fullmatch(r"\d+s", interval) and int(interval[:-1]) <= 15, (
        "training needs a short scrape interval"
    )


def test_local_prometheus_config_documents_fixed_ports() -> None:
    text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert 'ports = "fixed"' in text


def test_alert_rules_are_labelled_and_annotated() -> None:
    names = []
    for group in _yaml(ALERTS)["groups"]:
        for rule in group["rules"]:
            names.append(rule["alert"])
            assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    assert len(names) == len(set(names)), "duplicate alert names"


# ----------------------------------------------------------------------------- grafana


def _provisioned_datasource() -> dict:
    (source,) = _yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    return source


def test_grafana_provisioning() -> None:
    source = _provisioned_datasource()
    assert source["type"] == "prometheus" and source["uid"]
    (provider,) = _yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "redheart.yml")["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == GRAFANA_DASHBOARDS
