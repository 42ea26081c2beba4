"""Attempts on the wire and deadlines that measure progress (issue 11, Build 3 and 5), on real
stage servers on loopback (port 0)."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest
import torch
from conftest import free_port
from prometheus_client import CollectorRegistry
from test_adversarial import gpu_plan, stub
from test_stage_service import tiny_config

from gpu_stage.server import create_server as gpu_server
from orchestrator.stage_client import StageClient
from redheart import codec
from redheart.stage.contracts import GRADIENT
from redheart.stage.errors import StageError
from redheart.stage.mailbox import Mailbox
from redheart.stage.peer_link import GrpcPeerLink
from redheart.v1 import stage_pb2, tensor_pb2


@pytest.fixture
def gpu():
    cfg = tiny_config()
    registry = CollectorRegistry()
    server, port = gpu_server(cfg, host="127.0.0.1", port=0, registry=registry)
    client = StageClient("gpu stage", f"127.0.0.1:{port}", max_message_mb=64, rpc_timeout=20)
    settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
    # The CPU stage's address is one nothing listens on: only this test pushes activations.
    client.start_run(
        "run",
        settings,
        next_address="",
        prev_address=f"127.0.0.1:{free_port()}",
        regret_address="inprocess",
        first_step=0,
        reinitialize=True,
    )
    yield server, client, registry
    client.close()
    server.stop(0)


def _activation(server, attempt: int, micro_batch: int = 0) -> stage_pb2.TensorTransfer:
    hidden = server.servicer.runtime.part.module.shape.hidden_size
    return stage_pb2.TensorTransfer(
        envelope=tensor_pb2.Envelope(
            run_id="run", step=0, micro_batch=micro_batch, kind=tensor_pb2.ACTIVATION, attempt=attempt
        ),
        tensor=codec.encode(torch.ones(2, 16, hidden), name="activation"),
    )


def _wait_running(server, attempt: int) -> None:
    runtime = server.servicer.runtime
    end = time.monotonic() + 10
    while not (
        runtime.running.is_set()
        and runtime.current_plan is not None
        and runtime.current_plan.attempt == attempt
    ):
        assert time.monotonic() < end, f"attempt {attempt} never started"
        time.sleep(0.01)


def test_a_tensor_of_attempt_n_arriving_after_attempt_n_plus_1_started_is_dropped_and_counted(gpu):
    server, client, registry = gpu
    channel, s = stub(client.address)
    with channel:
        first = gpu_plan("run", 0)
        first.attempt = 1
        call = s.RunStep.future(first, timeout=30)
        _wait_running(server, 1)
        client.abort("run", 0, "test: attempt 1 fails", attempt=1)
        assert call.exception(timeout=10).code() == grpc.StatusCode.ABORTED
        second = gpu_plan("run", 0)
        second.attempt = 2
        call = s.RunStep.future(second, timeout=30)
        _wait_running(server, 2)
        late = s.PushTensor(_activation(server, attempt=1), timeout=10)  # the old try's activation, late
        assert late.stale and not late.duplicate
        assert registry.get_sample_value("redheart_stale_tensors_dropped_total", {"stage": "gpu"}) == 1
        assert server.servicer.runtime.mailbox.count("run", 0, ("activation",)) == 0
        # The fresh one of attempt 2 is not mistaken for a duplicate: it is taken by the round.
        fresh = s.PushTensor(_activation(server, attempt=2), timeout=10)
        assert not fresh.stale and not fresh.duplicate
        client.abort("run", 0, "test over", attempt=2)
        assert call.exception(timeout=10).code() == grpc.StatusCode.ABORTED


def test_tensors_of_an_old_attempt_held_early_are_dropped_when_the_new_attempt_starts(gpu):
    server, client, registry = gpu
    channel, s = stub(client.address)
    with channel:
        assert s.PushTensor(_activation(server, attempt=1, micro_batch=1), timeout=10).stale is False
        plan = gpu_plan("run", 0)
        plan.attempt = 2
        call = s.RunStep.future(plan, timeout=30)
        _wait_running(server, 2)
        assert registry.get_sample_value("redheart_stale_tensors_dropped_total", {"stage": "gpu"}) == 1
        client.abort("run", 0, "test over", attempt=2)
        assert call.exception(timeout=10).code() == grpc.StatusCode.ABORTED


def test_superseding_a_step_drops_its_queued_pushes_and_stops_the_one_retrying():
    link = GrpcPeerLink("cpu", "raw", 64, None)
    try:
        link.connect({"next": f"127.0.0.1:{free_port()}"})  # nothing listens: pushes retry UNAVAILABLE
        for mb in range(3):
            link.send(
                "next",
                "run",
                0,
                mb,
                "activation",
                torch.ones(2, 3),
                deadline=time.monotonic() + 120,
                attempt=1,
            )
        time.sleep(0.3)  # the first is now being retried
        start = time.monotonic()
        link.supersede("run", 0)
        link.flush(30)  # nothing left to deliver, and no delivery error: they were dropped on purpose
        assert time.monotonic() - start < 10
    finally:
        link.close()
    assert not link._thread.is_alive()


def test_a_wait_fails_only_when_nothing_arrived_for_the_deadline():
    box = Mailbox()
    key = ("run", 0, 9, GRADIENT)
    feeding = threading.Event()

    def feed() -> None:  # micro-batches 0-8 of the step keep arriving for 2.7 s, then the awaited one
        for i in range(9):
            box.put(("run", 0, i, GRADIENT), torch.zeros(1))
            time.sleep(0.3)
        box.put(key, torch.ones(1))
        feeding.set()

    threading.Thread(target=feed, daemon=True).start()
    start = time.monotonic()
    got = box.get(key, timeout=2.0, describe="the gradient of micro-batch 9")
    assert bool(got.eq(1).all()) and time.monotonic() - start >= 2.0  # longer than the deadline, progressing
    with pytest.raises(StageError) as err:
        box.get(("run", 0, 10, GRADIENT), timeout=0.5, describe="the gradient of micro-batch 10")
    assert err.value.kind == "deadline" and "nothing arrived for 0.5s" in str(err.value)
