"""The Prometheus files and our /metrics expositions, checked by Prometheus' own tool.

* ``promtool check config`` on both shipped scrape configs (which also loads alerts.yml);
* ``promtool check rules`` on alerts.yml (PromQL and annotation templates);
* every Grafana dashboard expression compiled by promtool as a recording rule, so a PromQL syntax
  error in the dashboard fails here without a running server;
* ``promtool test rules``: synthetic series in, the expected alerts out (and none before their time),
  so a rule that parses but never fires, or fires on a healthy run, fails;
* ``promtool check metrics`` on the text exposition of every process's registry.

promtool comes with Debian's ``prometheus`` package (``apt-get install prometheus``). Without it
these tests skip on a developer machine and FAIL under CI (``CI`` set), so CI cannot go green by
not running them.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import required_tool
from dashboard import dashboard_expressions
from process_metrics import BUILDERS, registry_of
from prometheus_client import generate_latest

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    return required_tool("promtool")


def _run(args: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, timeout=120)


def _out(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr).decode(errors="replace")


# ----------------------------------------------------------------------------- config and rules


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus-compose.yml"])
def test_check_config(promtool: str, name: str) -> None:
    proc = _run([promtool, "check", "config", str(PROMETHEUS_DIR / name)])
    assert proc.returncode == 0, _out(proc)
    # check config also checks the rule files it references: make sure it found ours.
    assert "1 rule files found" in _out(proc), _out(proc)


def test_check_rules(promtool: str) -> None:
    proc = _run([promtool, "check", "rules", str(ALERTS)])
    assert proc.returncode == 0, _out(proc)


def test_dashboard_expressions_compile(promtool: str, tmp_path: Path) -> None:
    exprs = dashboard_expressions()
    assert exprs, "the dashboard has no PromQL targets"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:expr_{i}", "expr": expr} for i, (_where, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    proc = _run([promtool, "check", "rules", str(path)])
    if proc.returncode != 0:
        # Name the panel: "expr_12" alone would send the reader counting.
        indexes = sorted({int(i) for i in re.findall(r"dashboard:expr_(\d+)", _out(proc))})
        where = [exprs[i] for i in indexes]
        pytest.fail(f"promtool rejects dashboard expressions {where}:\n{_out(proc)}")


# ----------------------------------------------------------------------------- alert behaviour


def _alerts_without_annotations(tmp_path: Path) -> Path:
    """alerts.yml with annotations removed.

    promtool test rules compares annotations verbatim; their templates are already validated by
    check rules, and what matters here is when each alert fires and with which labels.
    """
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    stripped = copy.deepcopy(rules)
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    path = tmp_path / "alerts-under-test.yml"
    path.write_text(yaml.safe_dump(stripped, sort_keys=False), encoding="utf-8")
    return path


def _alert(name: str, at: str, *expected: dict) -> dict:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in expected]}


ORCH = {"job": "redheart-orchestrator", "instance": "orch:9100"}
REGRET = {"job": "redheart-regret", "instance": "regret:9103"}


def _series(name: str, labels: dict, values: str) -> dict:
    inner = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


ALERT_TESTS = [
    {
        # A stage's scrape fails from minute 2: pending at 2m, firing after `for: 1m`; the healthy
        # regret service never fires.
        "interval": "1m",
        "input_series": [
            _series("up", {"job": "redheart-cpu-stage", "instance": "cpu:9101"}, "1 1 0x10"),
            _series("up", REGRET, "1x12"),
        ],
        "alert_rule_test": [
            _alert("RedHeartServiceDown", "1m"),
            _alert("RedHeartServiceDown", "2m"),
            _alert(
                "RedHeartServiceDown",
                "4m",
                {"severity": "critical", "job": "redheart-cpu-stage", "instance": "cpu:9101"},
            ),
        ],
    },
    {
        # Last step at t=60 s, then nothing: time() - 60 > 600 from 11m, firing 1m later. A second
        # orchestrator that has not stepped yet (timestamp 0) must not fire.
        "interval": "1m",
        "input_series": [
            _series("redheart_last_step_timestamp_seconds", ORCH, "0 60x30"),
            _series("redheart_last_step_timestamp_seconds", {**ORCH, "instance": "fresh:9100"}, "0x30"),
        ],
        "alert_rule_test": [
            _alert("RedHeartTrainingStalled", "10m"),
            _alert("RedHeartTrainingStalled", "13m", {"severity": "critical", **ORCH}),
        ],
    },
    {
        # Steps 0..9 during the first 10 minutes, then the counter stops. The orchestrator started
        # at t=0, so the process-age guard (10 min) is satisfied from 10m on.
        "interval": "1m",
        "input_series": [
            _series("redheart_train_steps_total", ORCH, "0+1x10 10x30"),
            _series("redheart_process_start_time_seconds", ORCH, "0x40"),
        ],
        "alert_rule_test": [
            _alert("RedHeartNoTrainingProgress", "12m"),
            _alert("RedHeartNoTrainingProgress", "27m", {"severity": "warning", **ORCH}),
        ],
    },
    {
        # A young orchestrator that has not stepped yet (still generating data, training the
        # tokenizer) must not page anybody.
        "interval": "1m",
        "input_series": [
            _series("redheart_train_steps_total", ORCH, "0x8"),
            _series("redheart_process_start_time_seconds", ORCH, "0x8"),
        ],
        "alert_rule_test": [_alert("RedHeartNoTrainingProgress", "8m")],
    },
    {
        # One non-finite step at minute 3: a warning right away; not a divergence (1 of 10 steps).
        "interval": "1m",
        "input_series": [
            _series("redheart_train_nonfinite_total", ORCH, "0 0 0 1x10"),
            _series("redheart_train_steps_total", ORCH, "0+1x13"),
        ],
        "alert_rule_test": [
            _alert("RedHeartNonFiniteLoss", "2m"),
            _alert("RedHeartNonFiniteLoss", "4m", {"severity": "warning", **ORCH}),
            _alert("RedHeartTrainingDiverged", "12m"),
        ],
    },
    {
        # Every step non-finite from the start: divergence, critical after `for: 5m`.
        "interval": "1m",
        "input_series": [
            _series("redheart_train_nonfinite_total", ORCH, "0+1x20"),
            _series("redheart_train_steps_total", ORCH, "0+1x20"),
        ],
        "alert_rule_test": [_alert("RedHeartTrainingDiverged", "10m", {"severity": "critical", **ORCH})],
    },
    {
        # A worker dies at minute 2 and is not replaced: warning after `for: 2m`.
        "interval": "1m",
        "input_series": [_series("redheart_regret_workers_alive", REGRET, "4 4 3x10")],
        "alert_rule_test": [
            _alert("RedHeartRegretWorkersDown", "3m"),
            _alert("RedHeartRegretWorkersDown", "5m", {"severity": "warning", **REGRET}),
        ],
    },
    {
        # The CPU stage waits 70% of each step for 20 minutes; the GPU stage 10% (healthy).
        "interval": "1m",
        "input_series": [
            _series("redheart_pipeline_bubble_ratio", {**ORCH, "stage": "cpu"}, "0.7x25"),
            _series("redheart_pipeline_bubble_ratio", {**ORCH, "stage": "gpu"}, "0.1x25"),
        ],
        "alert_rule_test": [
            _alert("RedHeartHighPipelineBubble", "10m"),
            _alert("RedHeartHighPipelineBubble", "20m", {"severity": "warning", **ORCH, "stage": "cpu"}),
        ],
    },
]


def test_alert_rules_fire_when_expected(promtool: str, tmp_path: Path) -> None:
    rules = _alerts_without_annotations(tmp_path)
    spec = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": ALERT_TESTS}
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    proc = _run([promtool, "test", "rules", str(path)])
    assert proc.returncode == 0, _out(proc)


def test_alert_tests_cover_the_required_alerts() -> None:
    tested = {case["alertname"] for test in ALERT_TESTS for case in test["alert_rule_test"]}
    defined = {
        rule["alert"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    required = {
        "RedHeartServiceDown",
        "RedHeartTrainingStalled",
        "RedHeartNonFiniteLoss",
        "RedHeartRegretWorkersDown",
        "RedHeartHighPipelineBubble",
    }
    assert required <= defined, f"alerts.yml lacks {required - defined}"
    assert required <= tested, f"no promtool test for {required - tested}"
    assert tested <= defined, f"tests name alerts that do not exist: {tested - defined}"


# ----------------------------------------------------------------------------- expositions


@pytest.mark.parametrize("process", sorted(BUILDERS))
def test_check_metrics_exposition(promtool: str, process) -> None:
    text = generate_latest(registry_of(process))
    assert b"redheart_" in text
    proc = _run([promtool, "check", "metrics"], stdin=text)
    assert proc.returncode == 0 and not _out(proc).strip(), f"promtool check metrics:\n{_out(proc)}"
