"""Configs, servers, one-call helpers and fixtures shared by the [security] and [wire] tests (test_security*.py)."""

from __future__ import annotations

import contextlib
import os
import textwrap

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import OPENSSL, make_pki

from cpu_stage.server import create_server as cpu_server
from redheart.config import HybridConfig, SecurityConfig
from redheart.rpc import make_channel
from redheart.v1 import stage_pb2, stage_pb2_grpc
from regret_service.server import create_server as regret_server

needs_openssl = pytest.mark.skipif(  # each test_security*.py: pytestmark = needs_openssl
    OPENSSL is None and not os.environ.get("CI"), reason="needs the openssl command line (required under CI)"
)


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


def write(tmp_path, text):
    p = tmp_path / "hybrid.toml"
    p.write_text(textwrap.dedent(text))
    return p


# ----------------------------------------------------------------------------- fixtures
# Test modules load them with `pytest_plugins = ["security_support"]`.


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


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
