"""deploy/ is parsed for real and checked against the code it deploys.

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

import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from process_metrics import all_sample_names, sample_names

from redheart.config import (
    CpuStageConfig,
    GpuStageConfig,
    OrchestratorConfig,
    RegretConfig,
    load_config,
)

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


# ----------------------------------------------------------------------------- config


def test_hybrid_toml_loads_and_targets_the_services() -> None:
    config = load_config(HYBRID_TOML, env={})
    assert config.launch.mode == "remote"
    assert config.metrics.host == "0.0.0.0", "Prometheus in another container must reach /metrics"
    for service, section in SECTION.items():
        sec = getattr(config, section)
        grpc_port, metrics_port = DEFAULTS[service]
        assert sec.host == "0.0.0.0", f"{section}.host must bind all interfaces in a container"
        assert sec.address == f"{service}:{grpc_port}", f"{section}.address must name the {service} service"
        assert (sec.port, sec.metrics_port) == (grpc_port, metrics_port), (
            f"{section} ports differ from the defaults"
        )
    assert config.orchestrator.metrics_port == DEFAULTS["orchestrator"][1]
    assert config.orchestrator.output_dir.startswith(DATA_ROOT + "/")
    assert config.data.path.startswith(DATA_ROOT + "/")


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


# ----------------------------------------------------------------------------- compose


def _compose() -> dict:
    return _yaml(COMPOSE)


def _config_mount(volumes: list) -> str:
    """The in-container path of deploy/config/hybrid.toml among compose volume entries."""
    found = []
    for entry in volumes:
        if isinstance(entry, str):
            source, target = entry.split(":")[:2]
        else:
            source, target = entry["source"], entry["target"]
        if (COMPOSE.parent / source).resolve() == HYBRID_TOML.resolve():
            found.append(target)
    assert len(found) == 1, f"expected one mount of deploy/config/hybrid.toml, found {found}"
    return found[0]


def _config_flag(command: list[str]) -> str:
    assert "--config" in command, f"{command} does not pass --config"
    return command[command.index("--config") + 1]


def test_compose_services() -> None:
    services = _compose()["services"]
    assert set(services) >= {"cpu-stage", "gpu-stage", "regret", "orchestrator", "prometheus", "grafana"}
    images = set()
    for name, (grpc_port, metrics_port) in DEFAULTS.items():
        service = services[name]
        command = service["command"]
        assert command[0] == COMMAND[name]
        # The same file at the same path everywhere, and the process told to read it.
        assert _config_mount(service["volumes"]) == CONFIG_PATH, name
        assert _config_flag(command) == CONFIG_PATH, name
        expected_ports = {str(p) for p in (grpc_port, metrics_port) if p is not None}
        assert {str(p) for p in service["expose"]} == expected_ports, f"{name} exposes {service['expose']}"
        if grpc_port is not None:
            test = service["healthcheck"]["test"]
            assert test[-1] == str(grpc_port), f"{name} health-checks port {test[-1]}, serves {grpc_port}"
        images.add(service["image"])
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert "nvidia" in COMPOSE.read_text(), "document the optional GPU reservation of gpu-stage"
    assert set(services["orchestrator"]["depends_on"]) == {"cpu-stage", "gpu-stage", "regret"}


def test_compose_shares_the_run_volume_with_the_stages() -> None:
    # The stages write checkpoint shards under orchestrator.output_dir, which the orchestrator then
    # checks and completes with the manifest: they must see the same directory.
    compose = _compose()
    mounts = {}
    for name in ("orchestrator", "cpu-stage", "gpu-stage"):
        named = [
            v for v in compose["services"][name]["volumes"] if isinstance(v, str) and not v.startswith(".")
        ]
        mounts[name] = {tuple(v.split(":")[:2]) for v in named}
    shared = set.intersection(*mounts.values())
    assert any(target == DATA_ROOT and source in compose["volumes"] for source, target in shared), mounts


def test_compose_prometheus_and_grafana_mount_the_shipped_files() -> None:
    services = _compose()["services"]

    def targets(service: str) -> dict[str, str]:
        out = {}
        for entry in services[service]["volumes"]:
            source, target = entry.split(":")[:2]
            if source.startswith("."):
                out[str((COMPOSE.parent / source).resolve())] = target
        return out

    prom = targets("prometheus")
    assert (
        prom[str((DEPLOY / "prometheus" / "prometheus-compose.yml").resolve())]
        == "/etc/prometheus/prometheus.yml"
    )
    assert prom[str(ALERTS.resolve())] == "/etc/prometheus/alerts.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    graf = targets("grafana")
    assert graf[str((DEPLOY / "grafana" / "provisioning").resolve())] == "/etc/grafana/provisioning"
    assert graf[str((DEPLOY / "grafana" / "dashboards").resolve())] == GRAFANA_DASHBOARDS
    for source in list(prom) + list(graf):
        assert Path(source).exists(), source


# ----------------------------------------------------------------------------- kubernetes


def _k8s_resources() -> list[dict]:
    kustomization = _yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml must list every manifest in deploy/k8s"
    docs = []
    for name in listed:
        for doc in _yaml_all(K8S / name):
            doc["_file"] = name
            docs.append(doc)
    return docs


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in _k8s_resources() if d["kind"] == kind}


def _pod_specs() -> dict[str, dict]:
    specs = {name: d["spec"]["template"] for name, d in _by_kind("Deployment").items()}
    for job in _by_kind("Job").values():
        specs["orchestrator"] = job["spec"]["template"]
    return specs


def test_k8s_has_a_deployment_and_service_per_stage_service_and_a_job() -> None:
    deployments, services = _by_kind("Deployment"), _by_kind("Service")
    assert set(deployments) == {"cpu-stage", "gpu-stage", "regret"}
    assert set(services) == {"cpu-stage", "gpu-stage", "regret"}
    jobs = _by_kind("Job")
    assert len(jobs) == 1
    (job,) = jobs.values()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][0] == COMMAND["orchestrator"]
    namespaces = {d["metadata"].get("namespace") for d in _k8s_resources() if d["kind"] != "Namespace"}
    assert namespaces == {"redheart"} == set(_by_kind("Namespace"))
    for name, deployment in deployments.items():
        assert deployment["spec"]["replicas"] == 1
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), f"{name}: selector does not match the pod labels"
        assert services[name]["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no pod"


def test_k8s_ports_probes_and_annotations_match_the_config_defaults() -> None:
    services = _by_kind("Service")
    for name, template in _pod_specs().items():
        grpc_port, metrics_port = DEFAULTS[name]
        (container,) = template["spec"]["containers"]
        assert container["command"][0] == COMMAND[name]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports.get("metrics") == metrics_port, f"{name} metrics port {ports}"
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port), name
        assert annotations["prometheus.io/path"] == "/metrics"
        if grpc_port is None:
            continue
        assert ports.get("grpc") == grpc_port, f"{name} gRPC port {ports}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, f"{name} {probe}"
        service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in services[name]["spec"]["ports"]}
        assert service_ports == {"grpc": (grpc_port, "grpc"), "metrics": (metrics_port, "metrics")}, name


def test_k8s_config_is_mounted_at_the_same_path_everywhere() -> None:
    configmaps = _by_kind("ConfigMap")
    assert set(configmaps) == {"redheart-config"}
    config_volumes = set()
    for name, template in _pod_specs().items():
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            paths = []
            for mount in container["volumeMounts"]:
                volume = volumes[mount["name"]]
                if volume.get("configMap", {}).get("name") == "redheart-config":
                    file = mount.get("subPath") or "hybrid.toml"
                    paths.append(
                        mount["mountPath"] if mount.get("subPath") else f"{mount['mountPath']}/{file}"
                    )
                    config_volumes.add(mount["name"])
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in _by_kind("PersistentVolumeClaim")
            assert paths == [CONFIG_PATH], f"{name}: config mounted at {paths}"
            assert _config_flag(container["command"] + container.get("args", [])) == CONFIG_PATH, name


def test_k8s_shared_run_volume() -> None:
    (claim,) = _by_kind("PersistentVolumeClaim").values()
    assert "ReadWriteMany" in claim["spec"]["accessModes"], "the stages are on different nodes"
    for name in ("orchestrator", "cpu-stage", "gpu-stage"):
        spec = _pod_specs()[name]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert claims.get(mounts.get(DATA_ROOT)) == claim["metadata"]["name"], name


def test_k8s_configmap_is_deploy_config_hybrid_toml() -> None:
    text = _by_kind("ConfigMap")["redheart-config"]["data"]["hybrid.toml"]
    assert text == HYBRID_TOML.read_text(encoding="utf-8"), (
        "configmap.yaml drifted from deploy/config/hybrid.toml"
    )
    tomllib.loads(text)


def test_k8s_configmap_loads_with_load_config(tmp_path: Path) -> None:
    path = tmp_path / "hybrid.toml"
    path.write_text(_by_kind("ConfigMap")["redheart-config"]["data"]["hybrid.toml"], encoding="utf-8")
    config = load_config(path, env={})
    assert config.launch.mode == "remote"


def test_k8s_gpu_stage_requests_a_gpu_and_avoids_the_cpu_stage_node() -> None:
    pods = _pod_specs()
    (gpu,) = pods["gpu-stage"]["spec"]["containers"]
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert str(gpu["resources"]["requests"]["nvidia.com/gpu"]) == "1"
    # The GPU stage must fail on a node without CUDA instead of silently training on its CPU.
    overrides = [gpu["args"][i + 1] for i, arg in enumerate(gpu["args"]) if arg == "--set"]
    assert load_config(HYBRID_TOML, overrides=overrides, env={}).gpu_stage.device == "cuda"

    def anti_affinity_to(pod: str) -> set[str]:
        terms = pods[pod]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        out = set()
        for term in terms:
            assert term["topologyKey"] == "kubernetes.io/hostname"
            for expr in term["labelSelector"]["matchExpressions"]:
                if expr["key"] == "app.kubernetes.io/component" and expr["operator"] == "In":
                    out |= set(expr["values"])
        return out

    assert "cpu-stage" in anti_affinity_to("gpu-stage")
    assert "gpu-stage" in anti_affinity_to("cpu-stage")
    for name in ("cpu-stage", "gpu-stage"):
        assert pods[name]["metadata"]["labels"]["app.kubernetes.io/component"] == name


# ----------------------------------------------------------------------------- image


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_dockerfile_builds_from_what_exists() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text
    assert "TORCH_INDEX_URL" in text, "a build argument selects the CUDA torch build"
    # Every COPY source from the build context must exist (or `docker build` fails).
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        parts = shlex.split(line)
        for source in parts[:-1]:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
    # The packages the image installs are the project's.
    packages = set(_pyproject()["tool"]["setuptools"]["packages"]["find"]["include"])
    copied = {
        Path(s).name
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
        for s in shlex.split(line)[:-1]
    }
    assert {p.rstrip("*") for p in packages} <= copied, f"the image misses packages of {packages}"


def test_every_deployed_command_is_a_project_script() -> None:
    scripts = _pyproject()["project"]["scripts"]
    assert set(COMMAND.values()) <= set(scripts)
    for name, module_fn in scripts.items():
        if name in COMMAND.values():
            module = module_fn.split(":")[0]
            # The package must at least exist; the CLI module itself may still be in progress.
            assert importlib.util.find_spec(module.split(".")[0]) is not None, module


def test_dataclass_defaults_are_what_the_deploy_files_assume() -> None:
    # The comments and docs quote these numbers (docs/deploy.md, docs/metrics.md, the Dockerfile's
    # EXPOSE): if a default port changes in redheart/config/services.py, this names what to update.
    assert DEFAULTS == {
        "cpu-stage": (50051, 9101),
        "gpu-stage": (50052, 9102),
        "regret": (50053, 9103),
        "orchestrator": (None, 9100),
    }
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.M).group(1).split()
    assert {int(p) for p in exposed} == {p for pair in DEFAULTS.values() for p in pair if p is not None}
