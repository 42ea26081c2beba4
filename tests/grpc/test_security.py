"""[security]: TLS, mutual TLS and the shared token on real servers (port 0), and the [wire] caps.

Certificates are made once per session with the openssl command line (tests/pki.py, the same
commands as docs/security.md): a CA, a service certificate for localhost / 127.0.0.1, a client
certificate, and a second CA that nobody trusts with a certificate of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import OPENSSL, make_pki
from synthetic import synthetic_batch

from cpu_stage.server import create_server as cpu_server
from gpu_stage.server import create_server as gpu_server
from orchestrator.pipeline import PipelineDriver
from orchestrator.stage_client import StageClient
from redheart import codec
from redheart.config import REDACTED, ConfigError, HybridConfig, SecurityConfig, load_config
from redheart.regret_client import RegretClient
from redheart.rpc import ServiceError, TokenAuthInterceptor, make_channel, wait_for_serving
from redheart.v1 import regret_pb2, regret_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2
from regret_service.server import create_server as regret_server

pytestmark = pytest.mark.skipif(
    OPENSSL is None and not os.environ.get("CI"), reason="needs the openssl command line (required under CI)"
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls(pki, **extra) -> dict:
    return {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), "tls_ca": str(pki.ca), **extra}


def mtls(pki, **extra) -> dict:
    return tls(pki, require_client_cert=True, **extra)


def client(pki, **fields) -> SecurityConfig:
    """A client-side [security] (client configs are validated like a file, in remote mode)."""
    return HybridConfig(security=fields, launch={"mode": "remote"}).security


def stage_config(security: dict, **sections) -> HybridConfig:
    base = {
        "model": {"preset": "tiny"},
        "train": {"batch_size": 8, "micro_batch_size": 2, "learning_rate": 1e-3},
        "regret": {"address": "inprocess", "num_workers": 1},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return HybridConfig(security=security, **base)


@contextlib.contextmanager
def cpu_stage(security: dict, **sections):
    srv, port = cpu_server(stage_config(security, **sections), host="127.0.0.1", port=0)
    try:
        yield f"127.0.0.1:{port}", srv
    finally:
        srv.stop(0)


def describe(address, security=None, *, metadata=None, timeout=5.0):
    with make_channel(address, 16, security) as channel:
        return stage_pb2_grpc.PipelineStageStub(channel).Describe(
            stage_pb2.DescribeRequest(), timeout=timeout, metadata=metadata
        )


def refused(address, security=None, *, metadata=None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        describe(address, security, metadata=metadata)
    return err.value


def health(address, security=None) -> int:
    with make_channel(address, 4, security) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def _bentham(rows: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.random((rows, 8), dtype=np.float32)
    x[:, 7] = x[:, 7] * 2 - 1
    return torch.from_numpy(x)


# ----------------------------------------------------------------------------- config


def write(tmp_path, text):
    p = tmp_path / "hybrid.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_security_defaults_are_off():
    s = HybridConfig().security
    assert not s.tls_enabled and s.resolved_token() == "" and s.describe() == "plaintext"


@pytest.mark.parametrize(
    "body, needle, line",
    [
        ('tls_key = "{key}"', "security.tls_key is set but security.tls_cert is not", 3),
        ('tls_cert = "{cert}"', "security.tls_cert is set but security.tls_key is not", 3),
        (
            'tls_cert = "{cert}"\ntls_key = "{key}"\nrequire_client_cert = true',
            "require_client_cert = true needs security.tls_ca",
            5,
        ),
        (
            'tls_cert = "/nonexistent/cert.pem"',
            "security.tls_cert: file '/nonexistent/cert.pem' does not exist",
            3,
        ),
        ('tls_cert = "{key}"\ntls_key = "{key}"', "is not a PEM certificate", 3),
        ('tls_cert = "{cert}"\ntls_key = "{cert}"', "is not a PEM private key", 4),
        ('tls_server_name = "localhost"', "tls_server_name is only used with TLS", 3),
        ('token = "abc"\ntoken_file = "{token}"', "security.token and security.token_file are both set", 3),
        ('token = "has space"', "contains spaces", 3),
        (
            'token_file = "/nonexistent/token"',
            "security.token_file: file '/nonexistent/token' does not exist",
            3,
        ),
    ],
)
def test_security_config_errors_name_file_line_and_fix(tmp_path, pki, body, needle, line):
    body = body.format(cert=pki.server_cert, key=pki.server_key, token=pki.token_file)
    p = write(tmp_path, "[model]\n[security]\n" + body + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(p, env={})
    assert f"{p}:{line}" in str(err.value) and needle in str(err.value)


def test_tls_ca_alone_is_a_client_config_refused_for_local_launch(tmp_path, pki):
    p = write(tmp_path, f'[security]\ntls_ca = "{pki.ca}"\n')
    with pytest.raises(
        ConfigError, match='launch.mode = "local" starts the services, which need security.tls_cert'
    ):
        load_config(p, env={})
    cfg = load_config(p, env={}, overrides=['launch.mode="remote"', "cpu_stage.port=1", "gpu_stage.port=2"])
    assert cfg.security.tls_enabled
    with pytest.raises(ConfigError, match="a server needs security.tls_cert"):
        cpu_server(stage_config({"tls_ca": str(pki.ca)}, launch={"mode": "remote"}), host="127.0.0.1", port=0)


def test_encrypted_key_is_refused(tmp_path, pki):
    enc = tmp_path / "enc.key"
    subprocess.run(
        [OPENSSL, "pkey", "-in", str(pki.server_key), "-aes256", "-passout", "pass:pw", "-out", str(enc)],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ConfigError, match="encrypted private key; gRPC needs it unencrypted"):
        HybridConfig(security={"tls_cert": str(pki.server_cert), "tls_key": str(enc)})


def test_token_never_appears_in_errors_dumps_or_repr(tmp_path, pki, monkeypatch):
    secret = "s3cr3t-" + "x" * 20
    p = write(tmp_path, f'[security]\ntoken_file = "{pki.token_file}"\n')
    with pytest.raises(ConfigError) as err:  # both set, the token given on the command line
        load_config(p, env={}, overrides=[f"security.token={secret}"])
    assert secret not in str(err.value) and f"security.token={REDACTED}" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a mistyped section still hides the value
        load_config(p, env={}, overrides=[f"securty.token={secret}"])
    assert secret not in str(err.value)
    with pytest.raises(ConfigError) as err:  # a non-string token is not echoed
        load_config(write(tmp_path, "[security]\ntoken = 1234567890123\n"), env={})
    assert "1234567890123" not in str(err.value) and "must be a string" in str(err.value)
    with pytest.raises(ConfigError) as err:
        HybridConfig(security={"token": secret + " tail"})
    assert secret not in str(err.value)

    cfg = HybridConfig(security={"token": secret})
    assert cfg.security.resolved_token() == secret
    for text in (repr(cfg), repr(cfg.security), str(cfg.to_dict()), cfg.to_toml()):
        assert secret not in text
    assert cfg.to_dict()["security"]["token"] == REDACTED
    assert cfg.to_dict(redact_secrets=False)["security"]["token"] == secret
    assert cfg.replace(**{"train.max_steps": 2}).security.token == secret
    # The written-out copy refuses to load without the token, and the environment supplies it.
    dump = tmp_path / "dump.toml"
    dump.write_text(cfg.to_toml())
    with pytest.raises(ConfigError, match="never stores the token") as err:
        load_config(dump, env={})
    assert secret not in str(err.value)
    assert load_config(dump, env={"REDHEART_SECURITY__TOKEN": secret}).security.resolved_token() == secret


def test_token_from_environment_or_command_line_is_taken_verbatim(tmp_path):
    p = write(tmp_path, "[model]\n")
    for given, want in (("12345678", "12345678"), ("1e10", "1e10"), ("true", "true"), ('"quoted"', "quoted")):
        assert load_config(p, env={"REDHEART_SECURITY__TOKEN": given}).security.token == want
        assert load_config(p, env={}, overrides=[f"security.token={given}"]).security.token == want


def test_token_file_is_read_and_stripped(pki):
    cfg = HybridConfig(security={"token_file": str(pki.token_file)})
    assert cfg.security.resolved_token() == pki.token
    assert cfg.to_dict()["security"]["token_file"] == str(pki.token_file)  # a path, not a secret


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


@pytest.fixture(scope="module")
def secure_regret(pki):
    config = HybridConfig(
        security=mtls(pki, token=pki.token),
        regret={"num_workers": 1, "max_batch": 256},
        wire={"max_message_mb": 1},
    )
    server, port = regret_server(config, host="127.0.0.1", port=0)
    yield f"127.0.0.1:{port}", config
    server.stop(grace=1.0)


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
        driver = PipelineDriver(cpu, gpu, cfg, "sec")
        result = driver.run_step(0, [synthetic_batch(1)], 1e-3)
        assert len(result.micro_batch_losses) == 4 and result.regret_computations == 8 * 7
    finally:
        if driver is not None:
            driver.close()
        cpu.close()
        gpu.close()
        cpu_srv.stop(0)
        gpu_srv.stop(0)


# ----------------------------------------------------------------------------- [wire] caps


def test_oversized_message_gets_resource_exhausted(secure_regret, pki):
    with cpu_stage({}, wire={"max_message_mb": 1}) as (address, _srv):
        # A raw channel that lets the client send more than the server accepts.
        channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 8 << 20)])
        with channel:
            big = codec.encode(torch.zeros(2, 64, 4096))  # 2 MiB
            request = stage_pb2.TensorTransfer(
                envelope=tensor_pb2.Envelope(run_id="r", kind=tensor_pb2.ACTIVATION), tensor=big
            )
            with pytest.raises(grpc.RpcError) as err:
                stage_pb2_grpc.PipelineStageStub(channel).PushTensor(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The project's channels carry the same cap, so the sender is stopped first, with the same status.
        with make_channel(address, 1) as small:
            with pytest.raises(grpc.RpcError) as err:
                stage_pb2_grpc.PipelineStageStub(small).PushTensor(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The regret service (wire.max_message_mb = 1 here), through TLS and the token.
    address, config = secure_regret
    with (
        make_channel(address, 1, config.security) as ok,
        grpc.secure_channel(
            address,
            grpc.ssl_channel_credentials(
                pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
            ),
            options=[("grpc.max_send_message_length", 8 << 20)],
        ) as raw,
    ):
        request = regret_pb2.ScoreRequest(
            envelope=tensor_pb2.Envelope(run_id="r"), bentham=codec.encode(_bentham(70_000))
        )
        with pytest.raises(grpc.RpcError) as err:
            regret_pb2_grpc.RegretServiceStub(raw).Score(
                request, timeout=10, metadata=[("authorization", f"Bearer {pki.token}")]
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = regret_pb2.ScoreRequest(
            envelope=tensor_pb2.Envelope(run_id="r"), bentham=codec.encode(_bentham(8))
        )
        assert regret_pb2_grpc.RegretServiceStub(ok).Score(small, timeout=10).regret_computations == 8 * 7


def test_more_concurrent_rpcs_than_the_cap_get_resource_exhausted():
    """Hold one RunStep open on the GPU stage (waiting for activations nobody sends) with
    wire.max_concurrent_rpcs = 1: any other call is refused until it ends."""
    cfg = stage_config({}, wire={"max_concurrent_rpcs": 1}, orchestrator={"step_deadline_seconds": 25.0})
    srv, port = gpu_server(cfg, host="127.0.0.1", port=0)
    address = f"127.0.0.1:{port}"
    gpu = StageClient("gpu stage", address, max_message_mb=16, rpc_timeout=20)
    held: dict = {}
    try:
        settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
        gpu.start_run(
            "cap",
            settings,
            next_address="",
            prev_address="127.0.0.1:1",
            regret_address="inprocess",
            first_step=0,
            reinitialize=True,
        )
        driver = PipelineDriver(gpu, gpu, cfg, "cap")
        _cpu_plan, gpu_plan = driver.step_plans(0, [synthetic_batch(3)])
        driver.close()

        def hold():
            try:
                held["result"] = gpu.run_step(gpu_plan, timeout=60)
            except ServiceError as exc:
                held["error"] = exc

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        # Until the RunStep is in flight on the server (a loaded machine may take a while).
        deadline = time.monotonic() + 60
        code = None
        while time.monotonic() < deadline and thread.is_alive():
            try:
                describe(address, timeout=5)
            except grpc.RpcError as exc:
                code = exc.code()
                break
            time.sleep(0.05)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"the held RunStep ended: {held}"
        with pytest.raises(ServiceError) as err:
            gpu.describe()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Release the held call (the orchestrator would send AbortStep; the cap refuses it too),
        # once the round is really waiting on the peer (not still being decoded).
        runtime = srv.servicer.runtime
        assert runtime.running.wait(20)
        runtime.abort("cap", 0, "test over")
        thread.join(30)
        assert not thread.is_alive() and held["error"].code == grpc.StatusCode.ABORTED
        assert describe(address).stage_name == "gpu"  # the slot is free again
    finally:
        gpu.close()
        srv.stop(0)
