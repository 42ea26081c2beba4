"""Acceptance: a real Prometheus scrapes a live run, and every dashboard query returns data.

The test starts Debian's ``prometheus`` binary with the shipped scrape config
(deploy/prometheus/prometheus.yml: same jobs, its alert rules; only the targets are moved to the
ports chosen here and the interval shortened to 1 s), starts a tiny training run with
``redheart-orchestrate`` (services launched locally with fixed ports), waits until the run has
taken steps and Prometheus has scraped every process several times, then evaluates every PromQL
expression of deploy/grafana/dashboards/redheart.json through the HTTP API and requires a non-empty
result from each.

All expressions are evaluated at one instant T at which Prometheus saw all four processes up, at
least 5 steps done and enough samples for every [1m] rate. Pinning T makes the check independent
of scheduling jitter: once the processes exit their series go stale, but the samples before T stay
in Prometheus' head block.

Why the run is long and stopped by the test: the tiny model takes ~20 ms a step on two cores, so a
30-step run is over about a second after its services come up -- fewer scrapes than a rate()
needs. The run is instead given MAX_STEPS (a safety net) and, once the queries are checked, stopped
with SIGTERM the way Kubernetes or systemd stops it; it must then finish its step, checkpoint and
exit 0 with its services stopped.

Everything started here is stopped in ``finally``: the orchestrator (which stops its services),
then any of its descendants still alive (tracked by psutil while the run goes), then Prometheus.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import required_tool
from dashboard import dashboard_expressions
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SHIPPED_PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"


# Which config keys give each Prometheus job's /metrics port.
JOB_PORT_KEYS = {
    "redheart-orchestrator": "orchestrator.metrics_port",
    "redheart-cpu-stage": "cpu_stage.metrics_port",
    "redheart-gpu-stage": "gpu_stage.metrics_port",
    "redheart-regret": "regret.metrics_port",
}
GRPC_PORT_KEYS = ("cpu_stage.port", "gpu_stage.port", "regret.port")

MIN_STEPS = 5
MAX_STEPS = 3000  # ends the run by itself if the test's SIGTERM never comes
STARTUP_DEADLINE_S = 420.0  # data generation, tokenizer, three services importing torch, on 2 cores
STOP_DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return required_tool("prometheus")


def _orchestrate_command() -> list[str]:
    script = Path(sys.executable).with_name("redheart-orchestrate")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orchestrator.cli"]


def _free_ports(count: int) -> list[int]:
    # Hold all sockets until every port is chosen so the same port is not handed out twice.
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 - loopback only
        return reply.read()


class PrometheusAPI:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        try:
            _http_get(self.base + "/-/ready", timeout=2)
            return True
        except (urllib.error.URLError, OSError):
            return False

    def _get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            body = _http_get(url, timeout=10)
        except urllib.error.HTTPError as exc:  # 400 on a bad query: keep Prometheus' message
            body = exc.read()
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise AssertionError(f"{path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self._get("/api/v1/query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._get(
            "/api/v1/query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=str(step)
        )["result"]

    def rule_groups(self) -> list[dict]:
        return self._get("/api/v1/rules")["groups"]


def _write_prometheus_config(path: Path, ports: dict[str, int]) -> None:
    config = yaml.safe_load(SHIPPED_PROMETHEUS.read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(JOB_PORT_KEYS), f"the shipped scrape config has jobs {sorted(jobs)}"
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    # Resolved against the shipped file, so the real alert rules load into the real server.
    config["rule_files"] = [str((SHIPPED_PROMETHEUS.parent / f).resolve()) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{ports[JOB_PORT_KEYS[job['job_name']]]}"]
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _write_run_config(path: Path, tmp: Path) -> None:
    path.write_text(
        f"""
[model]
preset = "tiny"

[data]
path = "{tmp / "data" / "scenarios.jsonl"}"
generated_count = 400
max_scenarios = 400

[train]
max_steps = {MAX_STEPS}
epochs = {MAX_STEPS}
batch_size = 4
micro_batch_size = 2
log_every_n_steps = 10

[checkpoint]
save_checkpoint_every = 25

[orchestrator]
output_dir = "{tmp / "run"}"
progress = "log"
""",
        encoding="utf-8",
    )


def _steps_done(metrics_port: int) -> float | None:
    try:
        text = _http_get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).decode()
    except (urllib.error.URLError, OSError):
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "redheart_train_steps":
            for sample in family.samples:
                if sample.name == "redheart_train_steps_total":
                    return sample.value
    return None


def _series_by_time(result: list[dict]) -> dict[float, float]:
    """A query_range result with one series (or none) as {timestamp: value}."""
    if not result:
        return {}
    assert len(result) == 1, result
    return {float(t): float(v) for t, v in result[0]["values"]}


def _pinned_instant(api: PrometheusAPI, since: float) -> float | None:
    """The latest instant at which every job was up with >= 3 scrapes in the last minute and the
    run had >= MIN_STEPS steps, as Prometheus itself saw it; None if there is none yet."""
    now = time.time()
    up = _series_by_time(api.query_range('count(up{job=~"redheart-.*"} == 1)', since, now))
    samples = _series_by_time(api.query_range('min(count_over_time(up{job=~"redheart-.*"}[1m]))', since, now))
    steps = _series_by_time(api.query_range("max(redheart_train_steps_total)", since, now))
    good = [
        t
        for t in up
        if up[t] == len(JOB_PORT_KEYS) and samples.get(t, 0) >= 3 and steps.get(t, 0) >= MIN_STEPS
    ]
    return max(good) if good else None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no output)"


def _logs(tmp: Path) -> str:
    parts = [
        f"--- orchestrator output ---\n{_tail(tmp / 'orchestrator.log')}",
        f"--- prometheus output ---\n{_tail(tmp / 'prometheus.log', 15)}",
    ]
    for log in sorted((tmp / "run").glob("**/*.log")):
        parts.append(f"--- {log.relative_to(tmp)} ---\n{_tail(log, 20)}")
    return "\n".join(parts)


def _stop(proc: subprocess.Popen | None, grace: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_descendants(tracked: dict[int, psutil.Process]) -> None:
    # psutil.Process remembers the creation time, so a recycled pid is never signalled by mistake.
    alive = []
    for proc in tracked.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.is_running():
                proc.terminate()
                alive.append(proc)
    _gone, still = psutil.wait_procs(alive, timeout=10)
    for proc in still:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    psutil.wait_procs(still, timeout=5)


# long: one live run scraped by a real Prometheus, checked in one test: splitting would start both again
def test_every_dashboard_query_returns_data_from_a_live_run(prometheus_binary: str, tmp_path: Path) -> None:
    ports = dict(zip([*JOB_PORT_KEYS.values(), *GRPC_PORT_KEYS, "prometheus"], _free_ports(8)))
    run_config = tmp_path / "hybrid.toml"
    _write_run_config(run_config, tmp_path)
    prom_config = tmp_path / "prometheus.yml"
    _write_prometheus_config(prom_config, ports)
    api = PrometheusAPI(ports["prometheus"])
    expressions = dashboard_expressions()
    assert len(expressions) >= 20

    orchestrator = prometheus = None
    tracked: dict[int, psutil.Process] = {}
    prom_log = open(tmp_path / "prometheus.log", "wb")
    run_log = open(tmp_path / "orchestrator.log", "wb")
    try:
        prometheus = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
                "--log.level=warn",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not api.ready():
            assert prometheus.poll() is None, f"prometheus exited:\n{_tail(tmp_path / 'prometheus.log')}"
            assert time.monotonic() < deadline, "prometheus did not become ready within 60 s"
            time.sleep(0.5)
        # The shipped alert rules load in a real server (not only in promtool).
        groups = {g["name"]: len(g["rules"]) for g in api.rule_groups()}
        assert groups.get("redheart-training") and groups.get("redheart-services"), groups

        started = time.time()
        command = _orchestrate_command() + ["--config", str(run_config), "--set", 'launch.ports="fixed"']
        command += [
            arg for key, port in ports.items() if key != "prometheus" for arg in ("--set", f"{key}={port}")
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", REDHEART_LOG_LEVEL="INFO")
        orchestrator = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=run_log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        tracked[orchestrator.pid] = psutil.Process(orchestrator.pid)

        pinned = None
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while pinned is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in tracked[orchestrator.pid].children(recursive=True):
                    tracked.setdefault(child.pid, child)
            steps = _steps_done(ports["orchestrator.metrics_port"])
            if (steps is not None and steps >= MIN_STEPS) or orchestrator.poll() is not None:
                pinned = _pinned_instant(api, started)
            if pinned is None:
                if orchestrator.poll() is not None:
                    pytest.fail(
                        f"the run exited with code {orchestrator.returncode} before Prometheus saw every "
                        f"process up with {MIN_STEPS} steps done\n{_logs(tmp_path)}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no instant with all four processes up and {MIN_STEPS} steps done within "
                        f"{STARTUP_DEADLINE_S:.0f} s (orchestrator reports {steps} steps)\n{_logs(tmp_path)}"
                    )
                time.sleep(1.0)

        empty, errors = [], []
        for where, expr in expressions:
            try:
                result = api.query(expr, at=pinned)
            except AssertionError as exc:
                errors.append(f"{where}: {expr}\n    {exc}")
                continue
            if not result:
                empty.append(f"{where}: {expr}")
        assert not errors, "Prometheus rejected dashboard queries:\n" + "\n".join(errors)
        assert not empty, (
            f"dashboard queries with no data at {pinned} (run started {started:.0f}):\n  "
            + "\n  ".join(empty)
        )

        # A graceful stop: finish the step, checkpoint, stop the services, exit 0.
        if orchestrator.poll() is None:
            orchestrator.send_signal(signal.SIGTERM)
        try:
            code = orchestrator.wait(STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not stop within {STOP_DEADLINE_S:.0f} s of SIGTERM\n{_logs(tmp_path)}")
        assert code == 0, f"the run exited with code {code} after SIGTERM\n{_logs(tmp_path)}"
        # Its services (and the regret workers) go with it; a few seconds of grace for the last
        # worker to be reaped.
        children = [p for pid, p in tracked.items() if pid != orchestrator.pid]
        _gone, leftovers = psutil.wait_procs(children, timeout=10)
        leftovers = [p for p in leftovers if _alive(p)]
        assert not leftovers, f"processes left running after the orchestrator exited: {leftovers}"
    finally:
        _stop(orchestrator, grace=30)
        _stop_descendants(tracked)
        _stop(prometheus, grace=15)
        prom_log.close()
        run_log.close()
