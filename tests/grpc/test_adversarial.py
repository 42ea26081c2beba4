"""Regression tests of the adversarial client's findings (issue 11), on real stage and regret
servers on loopback (port 0): each answers with the stated status, keeps serving, and stays
within the memory bounds its config gives."""

from __future__ import annotations

import dataclasses
import json
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from synthetic import synthetic_batch
from test_stage_service import Pipeline, rounds, tiny_config

from orchestrator.stage_client import micro_batch_message
from orchestrator.stages import plan_inputs
from redheart import codec
from redheart.config import HybridConfig
from redheart.stage.wire import STAGE_METHODS
from redheart.v1 import regret_pb2, regret_pb2_grpc, stage_pb2, stage_pb2_grpc, tensor_pb2
from regret_service.server import create_server as regret_server

CPU_KEYS, GPU_KEYS = plan_inputs(0, 2), plan_inputs(1, 2)  # what each stage's plan carries


@pytest.fixture
def pipeline():
    p = Pipeline(tiny_config())
    yield p
    p.close()


def stub(address: str) -> tuple[grpc.Channel, stage_pb2_grpc.PipelineStageStub]:
    channel = grpc.insecure_channel(
        address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    return channel, stage_pb2_grpc.PipelineStageStub(channel)


def status(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def gpu_plan(run_id: str, step: int, deadline: float = 20.0, n: int = 2) -> stage_pb2.StepPlan:
    batch = synthetic_batch(step)
    plan = stage_pb2.StepPlan(
        envelope=tensor_pb2.Envelope(run_id=run_id, step=step),
        accumulation_round=0,
        accumulation_steps=2,
        schedule="1f1b",
        loss_multiplier=0.125,
        loss_scale=1.0,
        deadline_seconds=deadline,
    )
    for i in range(n):
        plan.micro_batches.append(
            micro_batch_message(
                i, batch.slice(2 * i, 2 * i + 2).tensors, GPU_KEYS, batch.ids[2 * i : 2 * i + 2]
            )
        )
    return plan


def waiting_run_step(pipeline, deadline: float = 30.0):
    """A GPU RunStep that waits on its peer (the CPU stage never gets a plan); its future."""
    channel, s = stub(pipeline.gpu_addr)
    future = s.RunStep.future(gpu_plan(pipeline.run_id, 0, deadline), timeout=deadline + 10)
    runtime = pipeline.gpu_srv.servicer.runtime
    end = time.monotonic() + 10
    while not runtime.running.is_set():
        assert time.monotonic() < end, "the RunStep never started"
        time.sleep(0.01)
    return channel, future


# ----------------------------------------------------------------------------- StartRun / RunStep fields


def test_deeply_nested_start_run_settings_are_invalid_argument(pipeline):
    channel, s = stub(pipeline.cpu_addr)
    with channel:
        for text in ("[" * 100_000, '{"train": ' * 5000 + "{}" + "}" * 5000):
            code, details = status(
                s.StartRun, stage_pb2.StartRunRequest(run_id="x", train_settings_json=text), timeout=10
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "nested too deeply" in details, (
                code,
                details,
            )
    assert serving(pipeline.cpu_addr)
    assert len(pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3).micro_batch_losses) == 8


def test_a_huge_deadline_is_refused_with_the_configured_bound_and_the_stage_still_steps(pipeline):
    channel, s = stub(pipeline.gpu_addr)
    with channel:
        code, details = status(s.RunStep, gpu_plan(pipeline.run_id, 0, deadline=1e308), timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "wire.max_deadline_seconds" in details and "3600" in details
    assert len(pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3).micro_batch_losses) == 8


def test_a_plan_above_the_configured_sample_and_token_bounds_is_refused_before_decoding():
    p = Pipeline(
        HybridConfig(
            model={"preset": "tiny"},
            train={"batch_size": 8, "micro_batch_size": 2},
            regret={"address": "inprocess"},
            wire={"max_plan_samples": 64, "max_plan_tokens": 2048},
        )
    )
    try:
        channel, s = stub(p.cpu_addr)
        with channel:
            ids = torch.zeros(1024, 64, dtype=torch.int64)
            plan = stage_pb2.StepPlan(
                envelope=tensor_pb2.Envelope(run_id=p.run_id, step=0),
                accumulation_round=0,
                accumulation_steps=1,
                schedule="1f1b",
                loss_multiplier=1.0,
                loss_scale=1.0,
                deadline_seconds=5,
            )
            plan.micro_batches.append(
                micro_batch_message(0, {"input_ids": ids, "attention_mask": ids}, CPU_KEYS)
            )
            code, details = status(s.RunStep, plan, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "wire.max_plan_samples = 64" in details, (
                details
            )
            small = torch.zeros(40, 64, dtype=torch.int64)  # 40 samples fit, 2560 positions do not
            plan.micro_batches[0].CopyFrom(
                micro_batch_message(0, {"input_ids": small, "attention_mask": small}, CPU_KEYS)
            )
            code, details = status(s.RunStep, plan, timeout=10)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "wire.max_plan_tokens = 2048" in details, (
                details
            )
        assert len(p.driver.run_step(0, rounds(0, p.cfg), 1e-3).micro_batch_losses) == 4
    finally:
        p.close()


def test_gpu_run_step_with_the_wrong_number_of_sample_ids_is_invalid_argument(pipeline):
    plan = gpu_plan(pipeline.run_id, 0)
    plan.micro_batches[1].sample_ids.append("one-too-many")
    channel, s = stub(pipeline.gpu_addr)
    with channel:
        code, details = status(s.RunStep, plan, timeout=10)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "3 sample_ids for a batch of 2" in details, (
        code,
        details,
    )
    assert len(pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3).micro_batch_losses) == 8


# ----------------------------------------------------------------------------- AbortStep marks


def test_a_huge_abort_attempt_does_not_poison_a_fresh_start_of_the_same_run(pipeline):
    settings = {
        "train": dataclasses.asdict(pipeline.cfg.train),
        "regret": dataclasses.asdict(pipeline.cfg.regret),
    }
    pipeline.gpu.abort(pipeline.run_id, 0, "hostile", attempt=65536)
    pipeline.cpu.abort(pipeline.run_id, 0, "hostile", attempt=65536)
    for client, nxt, prev, regret in (
        (pipeline.cpu, pipeline.gpu_addr, "", ""),
        (pipeline.gpu, "", pipeline.cpu_addr, "inprocess"),
    ):
        client.start_run(
            pipeline.run_id,
            settings,
            next_address=nxt,
            prev_address=prev,
            regret_address=regret,
            first_step=0,
            reinitialize=True,
        )
    pipeline.driver.attempts[0] = 1
    assert len(pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3).micro_batch_losses) == 8


def test_a_huge_abort_attempt_for_the_current_step_is_not_kept(pipeline):
    pipeline.gpu.abort(pipeline.run_id, 0, "hostile", attempt=65536)
    assert pipeline.gpu_srv.servicer.runtime.aborted_attempts == {}
    pipeline.driver.attempts[0] = 1  # attempt 2: would be refused if the mark had been kept
    assert len(pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3).micro_batch_losses) == 8


def test_an_abort_for_a_step_not_reached_yet_does_not_poison_it(pipeline):
    for client in (pipeline.cpu, pipeline.gpu):
        client.abort(pipeline.run_id, 1, "not reached", attempt=1)
        client.abort(pipeline.run_id, 7, "far ahead", attempt=3)
    for step in range(2):
        assert len(pipeline.driver.run_step(step, rounds(step, pipeline.cfg), 1e-3).micro_batch_losses) == 8


# ----------------------------------------------------------------------------- calls during a round


def test_control_calls_during_a_round_answer_failed_precondition_at_once(pipeline, tmp_path):
    channel, future = waiting_run_step(pipeline)
    c2, s = stub(pipeline.gpu_addr)
    try:
        settings = json.dumps({"train": dataclasses.asdict(pipeline.cfg.train)})
        calls = {
            "StartRun": (s.StartRun, stage_pb2.StartRunRequest(run_id="other", train_settings_json=settings)),
            "SaveState": (
                s.SaveState,
                stage_pb2.SaveStateRequest(run_id=pipeline.run_id, step=0, directory=str(tmp_path)),
            ),
            "LoadState": (
                s.LoadState,
                stage_pb2.LoadStateRequest(run_id=pipeline.run_id, step=0, directory=str(tmp_path)),
            ),
            "ApplyStep": (
                s.ApplyStep,
                stage_pb2.ApplyRequest(envelope=tensor_pb2.Envelope(run_id=pipeline.run_id, step=0)),
            ),
        }
        for name, (method, request) in calls.items():
            start = time.monotonic()
            code, details = status(method, request, timeout=10)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "a step is running" in details, (
                name,
                code,
                details,
            )
            assert time.monotonic() - start < 3, (
                f"{name} waited {time.monotonic() - start:.1f}s behind the round"
            )
        assert not future.done()
    finally:
        pipeline.gpu.abort(pipeline.run_id, 0, "test over")
        future.exception(timeout=10)  # the round ends (ABORTED)
        c2.close()
        channel.close()


def test_health_and_abort_answer_while_blocked_calls_fill_the_server(pipeline):
    """One RunStep waits on its peer and 24 retries of it wait for its lock: past the call budget
    the extra ones get RESOURCE_EXHAUSTED, and health Check and AbortStep still answer at once."""
    channel, future = waiting_run_step(pipeline)
    c2, s = stub(pipeline.gpu_addr)
    plan = gpu_plan(pipeline.run_id, 0, 30.0)
    retries = [s.RunStep.future(plan, timeout=40) for _ in range(24)]
    try:
        end = time.monotonic() + 10
        while sum(f.done() for f in retries) < 24 - 11 and time.monotonic() < end:
            time.sleep(0.05)
        refused = [f for f in retries if f.done()]
        assert refused and all(f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused), [
            (f.code(), f.details()) for f in refused
        ]
        start = time.monotonic()
        with grpc.insecure_channel(pipeline.gpu_addr) as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        s.AbortStep(stage_pb2.AbortRequest(run_id=pipeline.run_id, step=0, reason="free them"), timeout=3)
        assert time.monotonic() - start < 3
        assert future.exception(timeout=10).code() == grpc.StatusCode.ABORTED
        for f in retries:
            f.exception(timeout=35)  # each ends (ABORTED or refused), none hangs
    finally:
        for f in retries:
            f.cancel()
        c2.close()
        channel.close()
    assert serving(pipeline.gpu_addr)


# ----------------------------------------------------------------------------- bounded error texts


def test_huge_echoed_inputs_still_give_the_real_status(pipeline):
    channel, s = stub(pipeline.gpu_addr)
    with channel:
        bad = tensor_pb2.Tensor(dtype=tensor_pb2.FLOAT32, shape=[2, 3, 4], data=b"\0" * 5, name="n" * 100_000)
        push = stage_pb2.TensorTransfer(
            envelope=tensor_pb2.Envelope(
                run_id=pipeline.run_id, step=0, micro_batch=0, kind=tensor_pb2.ACTIVATION
            ),
            tensor=bad,
        )
        code, details = status(s.PushTensor, push, timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 1000, (code, len(details))
        code, details = status(
            s.SaveState,
            stage_pb2.SaveStateRequest(run_id="r" * 10_000, step=0, directory="/tmp/x"),
            timeout=10,
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and len(details) < 1000, (code, len(details))
        code, details = status(s.StartRun, stage_pb2.StartRunRequest(run_id="r" * 10_000), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 1000, (code, len(details))
        reason = "why " * 250_000  # 1 MB
        assert (
            status(
                s.AbortStep,
                stage_pb2.AbortRequest(run_id=pipeline.run_id, step=0, reason=reason, attempt=1),
                timeout=10,
            )[0]
            == grpc.StatusCode.OK
        )
        plan = gpu_plan(pipeline.run_id, 0)
        plan.attempt = 1
        code, details = status(s.RunStep, plan, timeout=10)
        assert code == grpc.StatusCode.ABORTED and "why why" in details and len(details) < 1000, (
            code,
            len(details),
        )
    assert serving(pipeline.gpu_addr)


# ----------------------------------------------------------------------------- bounded memory


def _push(s, run_id: str, step: int, mb: int, kind, hidden: int) -> tuple[grpc.StatusCode, str]:
    t = codec.encode(torch.zeros(2, 4, hidden), name="x")
    return status(
        s.PushTensor,
        stage_pb2.TensorTransfer(
            envelope=tensor_pb2.Envelope(run_id=run_id, step=step, micro_batch=mb, kind=kind), tensor=t
        ),
        timeout=10,
    )


def test_pushes_for_steps_and_passes_not_running_are_bounded_and_freed(pipeline):
    runtime = pipeline.gpu_srv.servicer.runtime
    limit = runtime.max_early_pushes
    hidden = runtime.part.module.shape.hidden_size
    channel, s = stub(pipeline.gpu_addr)
    with channel:
        for kind, step in ((tensor_pb2.EVAL_ACTIVATION, 9), (tensor_pb2.ACTIVATION, 0)):
            codes = [_push(s, pipeline.run_id, step, mb, kind, hidden)[0] for mb in range(limit + 20)]
            assert codes[:limit] == [grpc.StatusCode.OK] * limit
            assert set(codes[limit:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes[limit:])
        assert runtime.mailbox.count(pipeline.run_id, 9, ("eval_activation",)) == limit
        # An evaluation pass frees every other pass's leftovers; a training step its own.
        pipeline.driver.evaluate(synthetic_batch(5))
        assert runtime.mailbox.count(pipeline.run_id, 9, ("eval_activation",)) == 0
        pipeline.gpu.abort(pipeline.run_id, 0, "drop the early pushes")
        assert runtime.mailbox.count(pipeline.run_id, 0, ("activation",)) == 0
        # With the step's plan known, only its micro-batches are accepted.
        pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3)
        code, details = _push(s, pipeline.run_id, 1, 50, tensor_pb2.ACTIVATION, hidden)
        assert code == grpc.StatusCode.OK  # early, within the bound
    assert len(pipeline.driver.run_step(1, rounds(1, pipeline.cfg), 1e-3).micro_batch_losses) == 8


def test_the_regret_cache_is_bounded_in_bytes():
    config = HybridConfig(**{"regret.num_workers": 1, "regret.cache_mb": 1, "regret.max_batch": 50_000})
    server, port = regret_server(config, host="127.0.0.1", port=0)
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    )
    try:
        s = regret_pb2_grpc.RegretServiceStub(channel)
        x = np.random.default_rng(0).random((8000, 8), dtype=np.float32)  # ~256 kB request + ~96 kB response
        for i in range(12):
            s.Score(
                regret_pb2.ScoreRequest(
                    envelope=tensor_pb2.Envelope(run_id="r", step=i),
                    bentham=codec.encode(torch.from_numpy(x)),
                ),
                timeout=30,
            )
        entries, used = server.servicer.cache_usage()
        assert 0 < used <= 1 << 20 and entries < 12, (entries, used)
    finally:
        channel.close()
        server.stop(grace=1.0)


# ----------------------------------------------------------------------------- unparsable requests


@pytest.mark.parametrize("method", STAGE_METHODS)
def test_bytes_that_do_not_parse_are_invalid_argument(pipeline, method):
    payload = b"\xff\xff\xff\xff\x0f\x01"  # field 0 / truncated varint: not any protobuf message
    with grpc.insecure_channel(pipeline.gpu_addr) as ch:
        path = f"/redheart.v1.PipelineStage/{method}"
        if method == "GetParameters":
            call = ch.unary_stream(path, request_serializer=None, response_deserializer=None)
            code, details = status(lambda: list(call(payload, timeout=5)))
        else:
            code, details = status(
                ch.unary_unary(path, request_serializer=None, response_deserializer=None), payload, timeout=5
            )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid redheart.v1." in details, (
        code,
        details,
    )
    assert serving(pipeline.gpu_addr)


def test_bytes_that_do_not_parse_are_invalid_argument_for_the_regret_service():
    server, port = regret_server(HybridConfig(**{"regret.num_workers": 1}), host="127.0.0.1", port=0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            score = ch.unary_unary(
                "/redheart.v1.RegretService/Score", request_serializer=None, response_deserializer=None
            )
            code, details = status(score, b"\xff\xff\xff\xff\x0f\x01", timeout=5)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "redheart.v1.ScoreRequest" in details, (
            code,
            details,
        )
    finally:
        server.stop(grace=1.0)
