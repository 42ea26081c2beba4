"""A whole run with every channel on mutual TLS plus the shared token.

The orchestrator, both stages and the regret service are separate processes; the services demand a
client certificate signed by the test CA and the bearer token, so the run can only finish if the
orchestrator's calls, the stage <-> stage pushes, the GPU stage's regret calls and the health checks
all carry both. The token is given inline (the hardest case for keeping it secret): it must reach
the services (through the environment, since the run directory's config.toml never stores it) and
appear in no output, log, report or checkpoint.
"""

from __future__ import annotations

import json
import os

import grpc
import pytest
import torch
from conftest import run_cli
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import OPENSSL, make_pki

from orchestrator.launcher import LocalLauncher
from orchestrator.stage_client import StageClient
from redheart.config import REDACTED, load_config
from redheart.regret_client import RegretClient
from redheart.rpc import ServiceError, make_channel
from redheart.v1 import stage_pb2, stage_pb2_grpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        OPENSSL is None and not os.environ.get("CI"),
        reason="needs the openssl command line (required under CI)",
    ),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def secure_toml(tiny_toml, pki):
    with open(tiny_toml, "a") as f:
        f.write(
            "\n[security]\n"
            f'tls_cert = "{pki.server_cert}"\n'
            f'tls_key = "{pki.server_key}"\n'
            f'tls_ca = "{pki.ca}"\n'
            "require_client_cert = true\n"
            f'token = "{pki.token}"\n'
        )
    return tiny_toml


def _text_files(root):
    for path in root.rglob("*"):
        if path.is_file() and path.suffix in ("", ".toml", ".json", ".jsonl", ".log", ".txt", ".csv"):
            yield path


def test_secure_run_exits_0_and_never_leaks_the_token(tmp_path, tiny_toml, pki):
    config = secure_toml(tiny_toml, pki)
    result = run_cli(["orchestrator.cli", "--config", str(config), "--set", "train.max_steps=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 3 steps" in result.stdout
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert (
        report["steps"] == 3 and report["regret"]["computations"] == 3 * 8 * 7
    )  # scored by the regret service
    assert report["config"]["security"]["token"] == REDACTED
    assert f'token = "{REDACTED}"' in (out / "config.toml").read_text()
    logs = {p.name: p.read_text(errors="replace") for p in (out / "logs").glob("*.log")}
    assert {"cpu_stage.log", "gpu_stage.log", "regret.log"} <= set(logs)
    for name in ("cpu_stage.log", "gpu_stage.log", "regret.log"):
        assert "mTLS + token" in logs[name], name
    assert pki.token not in result.stdout and pki.token not in result.stderr
    leaked = [str(p) for p in _text_files(out) if pki.token in p.read_text(errors="replace")]
    assert not leaked, f"the token was written to {leaked}"


def test_locally_launched_services_refuse_plaintext_and_unauthenticated_calls(tmp_path, tiny_toml, pki):
    cfg = load_config(secure_toml(tiny_toml, pki), env={})
    resolved = tmp_path / "resolved.toml"
    resolved.write_text(cfg.to_toml())  # as the orchestrator does: the token is redacted there
    launcher = LocalLauncher(cfg, resolved, tmp_path / "logs")
    try:
        launcher.start(["cpu_stage", "gpu_stage", "regret"])
        no_token = cfg.replace(**{"security.token": ""}).security
        for name, svc in launcher.services.items():
            address = svc.address
            # Plaintext: the TLS handshake never happens.
            with grpc.insecure_channel(address) as channel:
                with pytest.raises(grpc.RpcError) as err:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, name
            # mTLS without the token: health answers, everything else is UNAUTHENTICATED.
            with make_channel(address, 16, no_token) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
                if name != "regret":
                    with pytest.raises(grpc.RpcError) as err:
                        stage_pb2_grpc.PipelineStageStub(channel).Describe(
                            stage_pb2.DescribeRequest(), timeout=5
                        )
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        with RegretClient(
            launcher.services["regret"].address, max_message_mb=16, timeout_seconds=5, security=no_token
        ) as rc:
            with pytest.raises(ServiceError) as err:
                rc.score("r", 0, 0, torch.rand(2, 8))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        # With the whole [security] (the token reached the services through the environment).
        stage = StageClient(
            "cpu stage",
            launcher.services["cpu_stage"].address,
            max_message_mb=16,
            rpc_timeout=10,
            security=cfg.security,
        )
        assert stage.describe().name == "cpu"
        stage.close()
        with RegretClient(
            launcher.services["regret"].address, max_message_mb=16, timeout_seconds=10, security=cfg.security
        ) as rc:
            assert rc.score("r", 0, 0, torch.rand(2, 8)).regret.shape == (2,)
    finally:
        launcher.stop_all()
    for svc in launcher.services.values():
        assert svc.proc.returncode == 0, f"{svc.name} exited with {svc.proc.returncode}"
        assert pki.token not in svc.log_path.read_text(errors="replace")
