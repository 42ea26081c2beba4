"""Fixtures of tests/grpc.

* the fuzz tests (test_fuzz_*.py): a sandbox working directory, both stage servers, the regret service;
* the [security] / [wire] tests (test_security*.py): the session's certificates (tests/pki.py) and
  a regret service behind mutual TLS and the token.
"""

from __future__ import annotations

import os

import grpc
import pytest
from fuzz_support import MAX_BATCH, Stages, tiny_config
from pki import make_pki
from security_support import mtls

from redheart.config import HybridConfig
from regret_service.server import create_server as regret_server


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """The servers' working directory, deep enough that relative traversal ("../../..") stays inside."""
    root = tmp_path_factory.mktemp("fuzz-sandbox")
    cwd = root.joinpath(*"abcdefgh", "cwd")
    cwd.mkdir(parents=True)
    previous = os.getcwd()
    os.chdir(cwd)
    yield root
    os.chdir(previous)


@pytest.fixture(scope="module")
def stages(sandbox):
    s = Stages(tiny_config(), sandbox)
    yield s
    s.close()


@pytest.fixture(scope="module")
def regret():
    config = HybridConfig(**{"regret.num_workers": 2, "regret.max_batch": MAX_BATCH})
    server, port = regret_server(config, host="127.0.0.1", port=0)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    yield server, channel
    channel.close()
    server.stop(grace=1.0)


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
