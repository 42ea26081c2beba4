"""deploy/ checked against the code it deploys: hybrid.toml, compose, Kubernetes and the image.

* ports in compose, the Kubernetes Services/containers/probes equal the defaults of
  redheart/config/, and deploy/config/hybrid.toml loads with load_config;
* the config is mounted at the same path in every compose service and every Kubernetes container,
  and the ConfigMap carries exactly deploy/config/hybrid.toml;
* the Dockerfile builds from what exists and every deployed command is a project script.

Parsing, metric names, Prometheus and Grafana are in test_deploy_observability.py.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

from deploy_support import (
    ALERTS,
    COMMAND,
    COMPOSE,
    CONFIG_PATH,
    DATA_ROOT,
    DEFAULTS,
    DEPLOY,
    DOCKERFILE,
    GRAFANA_DASHBOARDS,
    HYBRID_TOML,
    K8S,
    REPO,
    SECTION,
    _yaml,
    _yaml_all,
)

from redheart.config import load_config

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
