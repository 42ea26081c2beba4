"""The [wire] caps on real servers: oversized messages and too many concurrent RPCs get RESOURCE_EXHAUSTED."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest
import torch
from security_support import (
    _bentham,
    cpu_stage,
    describe,
    needs_openssl,
    stage_config,
)
from synthetic import synthetic_batch

from gpu_stage.server import create_server as gpu_server
from orchestrator.pipeline import PipelineDriver
from orchestrator.stage_client import StageClient
from redheart import codec
from redheart.rpc import ServiceError, make_channel
from redheart.v1 import regret_pb2, regret_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2

pytest_plugins = ["security_support"]  # its fixtures: pki, secure_regret

pytestmark = needs_openssl


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
        driver = PipelineDriver((gpu, gpu), cfg, "cap")
        _cpu_plan, gpu_plan = driver.step_plans(0, [synthetic_batch(3)])
        driver.close()

        def hold():
            try:
                held["result"] = gpu.run_step(gpu_plan, timeout=60)
            except ServiceError as exc:
                held["error"] = exc

        thread = threading.Thread(target=hold, daemon=True)
        thread.start()
        # Until the RunStep runs on the server (a loaded machine may take a while). Watched in
        # this process, not probed by RPC: a probe that reached the server first would take the
        # one slot and refuse the RunStep instead.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and thread.is_alive() and not srv.servicer.runtime.running.is_set():
            time.sleep(0.05)
        assert srv.servicer.runtime.running.is_set(), f"the held RunStep never ran: {held}"
        code = None
        try:
            describe(address, timeout=5)
        except grpc.RpcError as exc:
            code = exc.code()
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
