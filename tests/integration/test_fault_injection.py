"""The test-only fault injection hook (redheart/fault_injection.py): real servers, real SIGKILLs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

from orchestrator.stage_client import StageClient
from redheart import fault_injection
from redheart.config import HybridConfig
from redheart.rpc import ServiceError

SERVICE_TOML = """
[model]
preset = "tiny"
[metrics]
enabled = false
"""


def _plan(tmp_path, *faults):
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"faults": list(faults)}))
    return path


def test_without_a_plan_nothing_is_installed(monkeypatch):
    monkeypatch.delenv(fault_injection.PLAN_ENV, raising=False)
    assert fault_injection.server_interceptors() == []


def test_a_fault_fires_once_at_its_phase_and_step_only(tmp_path, monkeypatch):
    from cpu_stage.server import create_server

    plan = _plan(
        tmp_path,
        {"service": "cpu_stage", "phase": "SaveState", "step": 3, "action": "mark"},
        {"service": "cpu_stage", "phase": "Describe", "when": "after", "action": "mark"},
        {"service": "gpu_stage", "phase": "SaveState", "action": "mark"},
    )
    monkeypatch.setenv(fault_injection.PLAN_ENV, str(plan))
    monkeypatch.setenv(fault_injection.SERVICE_ENV, "cpu_stage")
    server, port = create_server(HybridConfig(model={"preset": "tiny"}), host="127.0.0.1", port=0)
    client = StageClient("cpu stage", f"127.0.0.1:{port}", max_message_mb=16, rpc_timeout=20)
    try:
        for step in (5, 3, 3):  # no run started: refused, but the handler was entered every time
            with pytest.raises(ServiceError, match="FAILED_PRECONDITION"):
                client.save("r", step, str(tmp_path / "shard"))
        assert sorted(fault_injection.fired(plan)) == [0]
        assert client.describe().rank == 0  # "after": the answer was computed; a mark lets it through
        fired = fault_injection.fired(plan)
    finally:
        client.close()
        server.stop(0)
    assert sorted(fired) == [0, 1]  # the gpu stage's fault is not this process's
    assert fired[0]["phase"] == "SaveState" and fired[0]["step"] == 3 and fired[0]["pid"] == os.getpid()
    assert fired[1]["phase"] == "Describe" and fired[1]["when"] == "after"


def _start(tmp_path, plan, restart_count=0):
    config = tmp_path / "service.toml"
    config.write_text(SERVICE_TOML)
    env = dict(
        cli_env(),
        **{
            fault_injection.PLAN_ENV: str(plan),
            fault_injection.SERVICE_ENV: "cpu_stage",
            fault_injection.RESTART_ENV: str(restart_count),
        },
    )
    argv = [
        sys.executable,
        "-m",
        "cpu_stage.cli",
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )


def _port(proc) -> int:
    for line in proc.stdout:
        if line.startswith("REDHEART_READY"):
            return int(line.split("port=")[1].split()[0])
    raise AssertionError(f"the service exited with {proc.wait(30)} before it was ready")


def test_a_kill_fault_sigkills_the_service_inside_the_call(tmp_path):
    plan = _plan(tmp_path, {"service": "cpu_stage", "phase": "Describe"})
    proc = _start(tmp_path, plan)
    try:
        client = StageClient(
            "cpu stage",
            f"127.0.0.1:{_port(proc)}",
            max_message_mb=16,
            rpc_timeout=20,
            alive=lambda: proc.poll() is None,
        )
        with pytest.raises(ServiceError, match="UNAVAILABLE"):
            client.describe()
        client.close()
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert fault_injection.fired(plan)[0]["pid"] == proc.pid


def test_a_startup_fault_kills_the_chosen_start_only(tmp_path):
    plan = _plan(tmp_path, {"service": "cpu_stage", "phase": "Startup", "step": 1})
    first = _start(tmp_path, plan, restart_count=0)  # not the start the fault names
    try:
        _port(first)
    finally:
        first.terminate()
        first.wait(30)
        first.stdout.close()
    restarted = _start(tmp_path, plan, restart_count=1)
    assert restarted.wait(60) == -signal.SIGKILL  # died while starting, never ready
    assert "REDHEART_READY" not in restarted.stdout.read()
    restarted.stdout.close()
    again = _start(tmp_path, plan, restart_count=1)  # fired once: the next try starts
    try:
        _port(again)
    finally:
        again.terminate()
        again.wait(30)
        again.stdout.close()
