"""[security]: TLS, mutual TLS and the shared token on real servers (port 0).

The [wire] caps are in test_security_wire_caps.py, the [security] config checks in
test_security_config.py, the helpers and fixtures in security_support.py.

Certificates are made once per session with the openssl command line (tests/pki.py, the same
commands as docs/security.md): a CA, a service certificate for localhost / 127.0.0.1, a client
certificate, and a second CA that nobody trusts with a certificate of its own.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from security_support import (
    _bentham,
    client,
    cpu_stage,
    describe,
    health,
    mtls,
    needs_openssl,
    refused,
    stage_config,
    tls,
)
from synthetic import synthetic_batch

from cpu_stage.server import create_server as cpu_server
from gpu_stage.server import create_server as gpu_server
from orchestrator.pipeline import PipelineDriver
from orchestrator.stage_client import StageClient
from redheart import codec
from redheart.config import HybridConfig
from redheart.regret_client import RegretClient
from redheart.rpc import ServiceError, TokenAuthInterceptor, make_channel, wait_for_serving
from redheart.v1 import regret_pb2, regret_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2

pytest_plugins = ["security_support"]  # its fixtures: pki, secure_regret

pytestmark = needs_openssl


# ----------------------------------------------------------------------------- TLS


def test_tls_trusting_the_ca_works_plaintext_and_other_ca_are_refused(pki):
    with cpu_stage(tls(pki)) as (address, _srv):
        assert describe(address, client(pki, tls_ca=str(pki.ca))).stage_name == "cpu"
        assert refused(address).code() == grpc.StatusCode.UNAVAILABLE  # plaintext client
        assert refused(address, client(pki, tls_ca=str(pki.rogue_ca))).code() == grpc.StatusCode.UNAVAILABLE
        # The name checked in the certificate can be overridden (connecting by IP to a DNS name) ...
        assert (
            describe(address, client(pki, tls_ca=str(pki.ca), tls_server_name="localhost")).stage_name
            == "cpu"
        )
        # ... and a name the certificate does not carry is refused.
        bad_name = client(pki, tls_ca=str(pki.ca), tls_server_name="stage.example.org")
        assert refused(address, bad_name).code() == grpc.StatusCode.UNAVAILABLE
        # Health answers over TLS too (wait_for_serving passes the same security).
        wait_for_serving(
            address, timeout=10, service_name="cpu stage", security=client(pki, tls_ca=str(pki.ca))
        )
        with pytest.raises(ServiceError, match="not SERVING"):
            wait_for_serving(address, timeout=1, service_name="cpu stage")  # plaintext never gets an answer


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(pki):
    with cpu_stage(mtls(pki)) as (address, _srv):
        no_cert = client(pki, tls_ca=str(pki.ca))
        rogue_cert = client(pki, tls_ca=str(pki.ca), tls_cert=str(pki.rogue_cert), tls_key=str(pki.rogue_key))
        for who in (None, no_cert, rogue_cert):
            assert refused(address, who).code() == grpc.StatusCode.UNAVAILABLE
        good = client(pki, tls_ca=str(pki.ca), tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
        assert describe(address, good).stage_name == "cpu"
        # The service certificate (serverAuth + clientAuth) is also a valid client certificate:
        # that is how the stages and the GPU stage's regret client authenticate to their peers.
        assert describe(address, HybridConfig(security=mtls(pki)).security).stage_name == "cpu"


# ----------------------------------------------------------------------------- token


def test_stage_token_unauthenticated_without_or_with_a_wrong_token(pki, caplog):
    caplog.set_level(logging.DEBUG)
    with cpu_stage({"token_file": str(pki.token_file)}) as (address, srv):
        for metadata in (
            None,
            [("authorization", "Bearer wrong")],
            [("authorization", pki.token)],
            [("authorization", f"Bearer {pki.token}x")],
            [("x-token", pki.token)],
        ):
            err = refused(address, metadata=metadata)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            assert pki.token not in (err.details() or "")
        # Two authorization headers are refused even when one is right.
        err = refused(
            address, metadata=[("authorization", "Bearer nope"), ("authorization", f"Bearer {pki.token}")]
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # A streaming method is refused the same way.
        with make_channel(address, 16) as channel:
            with pytest.raises(grpc.RpcError) as err:
                list(
                    stage_pb2_grpc.PipelineStageStub(channel).GetParameters(
                        stage_pb2.GetParametersRequest(), timeout=5
                    )
                )
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Through the project's client: ServiceError with the status, never the token.
        stage = StageClient("cpu stage", address, max_message_mb=16, rpc_timeout=5)
        with pytest.raises(ServiceError) as err:
            stage.describe()
        stage.close()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and pki.token not in str(err.value)
        # The right token works, from the file or inline.
        right = client(pki, token=pki.token)
        assert describe(address, right).stage_name == "cpu"
        stage = StageClient(
            "cpu stage",
            address,
            max_message_mb=16,
            rpc_timeout=5,
            security=client(pki, token_file=str(pki.token_file)),
        )
        assert stage.describe().name == "cpu" and stage.parameters()
        stage.close()
        # Health needs no token (Kubernetes probes cannot send one).
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        wait_for_serving(address, timeout=5, service_name="cpu stage")
    assert pki.token not in caplog.text


def test_token_is_compared_in_constant_time(monkeypatch):
    import redheart.rpc as rpc

    calls = []
    real = rpc.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(rpc.hmac, "compare_digest", spy)
    interceptor = TokenAuthInterceptor("abc")
    assert interceptor._authorized([("authorization", "Bearer abc")])
    assert not interceptor._authorized([("authorization", "Bearer abd")])
    assert not interceptor._authorized([("authorization", "Bearer \u00e9")])
    assert len(calls) == 2 and calls[0] == (b"Bearer abc", b"Bearer abc")


def test_refused_calls_are_counted_as_unauthenticated(pki):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    srv, port = cpu_server(stage_config({"token": pki.token}), host="127.0.0.1", port=0, registry=registry)
    try:
        assert refused(f"127.0.0.1:{port}").code() == grpc.StatusCode.UNAUTHENTICATED
        value = registry.get_sample_value(
            "redheart_grpc_server_handled_total",
            {"service": "cpu_stage", "method": "Describe", "code": "UNAUTHENTICATED"},
        )
        assert value == 1  # visible on the dashboards / alerts, e.g. a client with a stale token
    finally:
        srv.stop(0)


def test_regret_score_needs_the_token(pki, secure_regret):
    address, config = secure_regret
    no_token = client(pki, **mtls(pki))
    with RegretClient(address, max_message_mb=1, timeout_seconds=10, security=no_token) as rc:
        with pytest.raises(ServiceError) as err:
            rc.score("run", 0, 0, _bentham(4))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and pki.token not in str(err.value)
    with make_channel(address, 1, no_token) as channel:
        stub = regret_pb2_grpc.RegretServiceStub(channel)
        request = regret_pb2.ScoreRequest(
            envelope=tensor_pb2.Envelope(run_id="r"), bentham=codec.encode(_bentham(2))
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(request, timeout=10, metadata=[("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Health answers without the token (still over mTLS).
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with RegretClient(address, max_message_mb=1, timeout_seconds=10, security=config.security) as rc:
        reply = rc.score("run", 0, 0, _bentham(4))
    assert reply.regret.shape == (4,) and reply.regret_computations == 4 * 7
    # A plaintext client does not even reach the token check.
    with RegretClient(address, max_message_mb=1, timeout_seconds=1, security=None) as rc:
        with pytest.raises(ServiceError) as err:
            rc.score("run", 0, 0, _bentham(4))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_secured_pipeline_step_pushes_and_regret_calls(pki, secure_regret):
    """Orchestrator -> stages, stage <-> stage pushes and GPU stage -> regret, all mTLS + token."""
    regret_address, _ = secure_regret
    cfg = stage_config(mtls(pki, token=pki.token), regret={"num_workers": 1, "address": regret_address})
    cpu_srv, p1 = cpu_server(cfg, host="127.0.0.1", port=0)
    gpu_srv, p2 = gpu_server(cfg, host="127.0.0.1", port=0)
    cpu_addr, gpu_addr = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
    cpu = StageClient("cpu stage", cpu_addr, max_message_mb=16, rpc_timeout=20, security=cfg.security)
    gpu = StageClient("gpu stage", gpu_addr, max_message_mb=16, rpc_timeout=20, security=cfg.security)
    driver = None
    try:
        settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
        cpu.start_run(
            "sec",
            settings,
            next_address=gpu_addr,
            prev_address="",
            regret_address="",
            first_step=0,
            reinitialize=True,
        )
        gpu.start_run(
            "sec",
            settings,
            next_address="",
            prev_address=cpu_addr,
            regret_address=regret_address,
            first_step=0,
            reinitialize=True,
        )
        driver = PipelineDriver((cpu, gpu), cfg, "sec")
        result = driver.run_step(0, [synthetic_batch(1)], 1e-3)
        assert len(result.micro_batch_losses) == 4 and result.regret_computations == 8 * 7
    finally:
        if driver is not None:
            driver.close()
        cpu.close()
        gpu.close()
        cpu_srv.stop(0)
        gpu_srv.stop(0)
