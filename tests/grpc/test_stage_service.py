"""Real stage servers on loopback (port 0): protocol, validation and error statuses."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest
import torch
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from synthetic import synthetic_batch

from cpu_stage.server import create_server as cpu_server
from gpu_stage.server import create_server as gpu_server
from orchestrator.pipeline import PipelineDriver
from orchestrator.reference import SingleProcessTrainer
from orchestrator.stage_client import StageClient, micro_batch_message, start_stages
from redheart import codec
from redheart.config import HybridConfig
from redheart.rpc import ServiceError
from redheart.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2


def tiny_config(**train):
    t = {"batch_size": 8, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}
    t.update(train)
    return HybridConfig(model={"preset": "tiny"}, train=t, regret={"enabled": True, "address": "inprocess"})


class Pipeline:
    def __init__(self, cfg: HybridConfig):
        self.cfg = cfg
        self.cpu_srv, p1 = cpu_server(cfg, host="127.0.0.1", port=0)
        self.gpu_srv, p2 = gpu_server(cfg, host="127.0.0.1", port=0)
        self.cpu_addr, self.gpu_addr = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
        self.cpu = StageClient("cpu stage", self.cpu_addr, max_message_mb=64, rpc_timeout=20)
        self.gpu = StageClient("gpu stage", self.gpu_addr, max_message_mb=64, rpc_timeout=20)
        self.run_id = "test-run"
        settings = {"train": dataclasses.asdict(cfg.train), "regret": dataclasses.asdict(cfg.regret)}
        start_stages([self.cpu, self.gpu], self.run_id, settings, regret_address="inprocess")
        self.driver = PipelineDriver((self.cpu, self.gpu), cfg, self.run_id)

    def close(self):
        self.driver.close()
        for c in (self.cpu, self.gpu):
            c.close()
        self.cpu_srv.stop(0)
        self.gpu_srv.stop(0)


@pytest.fixture
def pipeline():
    p = Pipeline(tiny_config())
    yield p
    p.close()


def raw_stub(address):
    channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
    return channel, stage_pb2_grpc.PipelineStageStub(channel)


def rounds(step, cfg):
    return [synthetic_batch(step * 10 + r) for r in range(cfg.train.gradient_accumulation_steps)]


def test_health_is_serving(pipeline):
    for address in (pipeline.cpu_addr, pipeline.gpu_addr):
        with grpc.insecure_channel(address) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_describe_handshake(pipeline):
    cpu, gpu = pipeline.cpu.describe(), pipeline.gpu.describe()
    assert (cpu.rank, cpu.name, gpu.rank, gpu.name) == (0, "cpu", 1, "gpu")
    assert cpu.fingerprint == gpu.fingerprint == pipeline.cfg.model_fingerprint()
    assert cpu.settings["cpu_layers"] == 2 and "embeddings" in cpu.layer_range


def test_pipelined_steps_equal_single_process_with_accumulation(pipeline):
    cfg = pipeline.cfg
    ref = SingleProcessTrainer(cfg)
    for step in range(3):
        got = pipeline.driver.run_step(step, rounds(step, cfg), 1e-3)
        want = ref.step(step, rounds(step, cfg), 1e-3)
        assert len(got.micro_batch_losses) == 8  # 4 micro-batches x 2 accumulation rounds
        torch.testing.assert_close(
            torch.tensor(got.micro_batch_losses),
            torch.tensor(want["micro_batch_losses"]),
            rtol=1e-5,
            atol=4e-5,
        )
        assert got.regret_computations == 16 * 7 and got.bentham_evaluations == 16 * 21  # 16 scenarios
    live = {**pipeline.cpu.parameters(), **pipeline.gpu.parameters()}
    for name, value in ref.named_parameters().items():
        torch.testing.assert_close(live[name], value, rtol=1e-5, atol=4e-5, msg=name)


def _push(stub, run_id, step, mb, kind, tensor_msg):
    return stub.PushTensor(
        stage_pb2.TensorTransfer(
            envelope=tensor_pb2.Envelope(run_id=run_id, step=step, micro_batch=mb, kind=kind),
            tensor=tensor_msg,
        ),
        timeout=5,
    )


def test_malformed_tensor_gets_invalid_argument_and_the_server_keeps_serving(pipeline):
    channel, stub = raw_stub(pipeline.gpu_addr)
    with channel:
        bad = codec.encode(torch.zeros(2, 16, 64))
        bad.data = bad.data[:-3]
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, pipeline.run_id, 0, 0, tensor_pb2.ACTIVATION, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "byte length" in err.value.details() and "does not match shape [2, 16, 64]" in err.value.details()
        )
        for mutate, needle in [
            (lambda m: setattr(m, "dtype", 42), "unknown dtype code 42"),
            (lambda m: m.shape.extend([1] * 20), "rank"),
            (lambda m: m.shape.__setitem__(0, -1), "negative"),
        ]:
            msg = codec.encode(torch.zeros(2, 16, 64))
            mutate(msg)
            with pytest.raises(grpc.RpcError) as err:
                _push(stub, pipeline.run_id, 0, 0, tensor_pb2.ACTIVATION, msg)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
        wrong_width = codec.encode(torch.zeros(2, 16, 63))
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, pipeline.run_id, 0, 0, tensor_pb2.ACTIVATION, wrong_width)
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "[batch, seq, 64]" in err.value.details()
        )
        with pytest.raises(grpc.RpcError) as err:  # a gradient sent to the stage that only takes activations
            _push(stub, pipeline.run_id, 0, 0, tensor_pb2.GRADIENT, codec.encode(torch.zeros(2, 16, 64)))
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and "does not accept gradient" in err.value.details()
        )
    # ...and a valid step right after works.
    out = pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3)
    assert all(torch.isfinite(torch.tensor(out.micro_batch_losses)))


def test_out_of_order_and_unknown_steps_get_failed_precondition_naming_step(pipeline):
    pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3)
    channel, stub = raw_stub(pipeline.gpu_addr)
    with channel:
        act = codec.encode(torch.zeros(2, 16, 64))
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, pipeline.run_id, 0, 1, tensor_pb2.ACTIVATION, act)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "step 0 micro-batch 1" in err.value.details() and "already applied" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, pipeline.run_id, 7, 0, tensor_pb2.ACTIVATION, act)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "step 7" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, "someone-else", 1, 0, tensor_pb2.ACTIVATION, act)
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "not the current run" in err.value.details()
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.ApplyStep(
                stage_pb2.ApplyRequest(
                    envelope=tensor_pb2.Envelope(run_id=pipeline.run_id, step=1),
                    clip_coefficient=1.0,
                    learning_rate=1e-3,
                ),
                timeout=5,
            )
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "ApplyStep for step 1" in err.value.details()
        )
        plan = stage_pb2.StepPlan(
            envelope=tensor_pb2.Envelope(run_id=pipeline.run_id, step=5),
            accumulation_round=0,
            accumulation_steps=1,
            schedule="1f1b",
            loss_multiplier=1.0,
            loss_scale=1.0,
            deadline_seconds=1,
        )
        plan.micro_batches.append(stage_pb2.MicroBatch(index=0))
        with pytest.raises(grpc.RpcError) as err:
            stub.RunStep(plan, timeout=5)
        assert (
            err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            and "step 5" in err.value.details()
            and "expects step 1" in err.value.details()
        )


def test_duplicate_push_is_acknowledged_and_dropped(pipeline):
    channel, stub = raw_stub(pipeline.gpu_addr)
    with channel:
        act = codec.encode(torch.zeros(2, 16, 64))
        assert not _push(stub, pipeline.run_id, 0, 0, tensor_pb2.ACTIVATION, act).duplicate
        assert _push(stub, pipeline.run_id, 0, 0, tensor_pb2.ACTIVATION, act).duplicate


def test_tensors_above_4_mib_travel(pipeline):
    channel, stub = raw_stub(pipeline.gpu_addr)
    with channel:
        big = codec.encode(torch.randn(80, 256, 64))  # 5.2 MB
        assert len(big.data) > 4 * 1024 * 1024
        assert not _push(stub, pipeline.run_id, 0, 3, tensor_pb2.ACTIVATION, big).duplicate


def test_bad_inputs_in_a_plan_are_invalid_argument(pipeline):
    batch = synthetic_batch(1)
    batch.tensors["input_ids"][0, 0] = 999_999  # outside the vocabulary
    with pytest.raises(Exception) as err:
        pipeline.driver.run_step(0, [batch, synthetic_batch(2)], 1e-3)
    assert "INVALID_ARGUMENT" in str(err.value) and "input_ids outside [0, 2048)" in str(err.value)
    out = pipeline.driver.run_step(0, rounds(0, pipeline.cfg), 1e-3)  # the pipeline is still usable
    assert len(out.micro_batch_losses) == 8


def test_missing_peer_tensor_times_out_naming_step_and_micro_batch(pipeline):
    # Only the GPU stage gets a plan, so no activation ever arrives.
    batch = synthetic_batch(3)
    plan = stage_pb2.StepPlan(
        envelope=tensor_pb2.Envelope(run_id=pipeline.run_id, step=0),
        accumulation_round=0,
        accumulation_steps=2,
        schedule="1f1b",
        loss_multiplier=0.125,
        loss_scale=1.0,
        deadline_seconds=0.5,
    )
    keys = (
        "attention_mask",
        "labels.emotions",
        "labels.emotions_mask",
        "labels.bentham",
        "labels.bentham_mask",
        "labels.judgment",
    )
    plan.micro_batches.append(micro_batch_message(0, batch.slice(0, 2).tensors, keys))
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        pipeline.gpu.run_step(plan, timeout=10)
    assert time.monotonic() - start < 5
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "activation of micro-batch 0" in err.value.details and "step 0, micro-batch 0" in err.value.details


def test_unreachable_stage_fails_fast_naming_the_address():
    port = free_port()
    client = StageClient("cpu stage", f"127.0.0.1:{port}", max_message_mb=4, rpc_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        client.describe()
    assert time.monotonic() - start < 5
    assert f"cpu stage at 127.0.0.1:{port}" in str(err.value) and "UNAVAILABLE" in str(err.value)
    client.close()


def test_start_run_rejects_garbage(pipeline):
    channel, stub = raw_stub(pipeline.cpu_addr)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.StartRun(stage_pb2.StartRunRequest(run_id="x", train_settings_json="{nope"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not JSON" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.StartRun(stage_pb2.StartRunRequest(run_id=""), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_retried_run_step_returns_the_cached_result(pipeline):
    cpu_plan, gpu_plan = pipeline.driver.step_plans(0, [synthetic_batch(0)])
    first = pipeline.driver._run_on_stages(0, (cpu_plan, gpu_plan))
    again = pipeline.gpu.run_step(gpu_plan, timeout=10)
    assert [m.total_loss for m in again.micro_batches] == [m.total_loss for m in first[1].micro_batches]


def test_an_abort_that_overtakes_its_run_step_still_wins_and_the_next_attempt_runs(pipeline):
    cfg = pipeline.cfg
    cpu_plan, gpu_plan = pipeline.driver.step_plans(0, [synthetic_batch(0)])
    for plan in (cpu_plan, gpu_plan):
        plan.attempt = 1
    pipeline.gpu.abort(pipeline.run_id, 0, "test: overtaken", attempt=1)
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        pipeline.gpu.run_step(gpu_plan, timeout=10)
    assert err.value.code == grpc.StatusCode.ABORTED and "attempt 1 was aborted" in err.value.details
    assert time.monotonic() - start < 2  # refused at once, not after the step deadline
    # the driver's next try of the same step is attempt 2 on both stages (it counts attempts per step)
    pipeline.driver.attempts[0] = 1
    out = pipeline.driver.run_step(0, rounds(0, cfg), 1e-3)
    assert len(out.micro_batch_losses) == 8


def test_one_plan_per_step_ragged_micro_batches_fused_adamw_equal_single_process():
    # Long encoded rows, short texts: each micro-batch must travel at its own width, the whole
    # optimizer step (2 accumulation rounds x 4 micro-batches) in one plan, and still train exactly
    # like one process with the same fused AdamW.
    cfg = tiny_config(gradient_accumulation_steps=2)
    p = Pipeline(cfg)
    try:
        ref = SingleProcessTrainer(cfg)
        for runtime in (p.cpu_srv.servicer.runtime, p.gpu_srv.servicer.runtime):
            assert runtime.optimizer.defaults["fused"] is True
        assert all(opt.defaults["fused"] is True for opt in ref.optimizers)
        for step in range(2):
            batches = [synthetic_batch(50 + 10 * step + r, seq=64) for r in range(2)]
            for r, b in enumerate(batches):  # 2 to 21 real tokens per row
                lengths = [2 + (7 * i + 5 * r + 3 * step) % 20 for i in range(len(b))]
                mask = b.tensors["attention_mask"]
                mask[:] = (torch.arange(64)[None, :] < torch.tensor(lengths)[:, None]).long()
                b.tensors["input_ids"][mask == 0] = 0
            cpu_plan, gpu_plan = p.driver.step_plans(step, batches)
            assert len(cpu_plan.micro_batches) == len(gpu_plan.micro_batches) == 8
            assert cpu_plan.accumulation_steps == 1 and cpu_plan.loss_multiplier == pytest.approx(1 / 8)
            widths = {list(mb.inputs["input_ids"].shape)[1] for mb in cpu_plan.micro_batches}
            assert widths <= {8, 16, 24} and len(widths) > 1, widths
            got = p.driver.run_step(step, batches, 1e-3)
            want = ref.step(step, batches, 1e-3)
            torch.testing.assert_close(
                torch.tensor(got.micro_batch_losses),
                torch.tensor(want["micro_batch_losses"]),
                rtol=1e-5,
                atol=4e-5,
            )
            assert got.computed_tokens < 16 * 64 / 2 and got.tokens <= got.computed_tokens
        live = {**p.cpu.parameters(), **p.gpu.parameters()}
        for name, value in ref.named_parameters().items():
            torch.testing.assert_close(live[name], value, rtol=1e-5, atol=4e-5, msg=name)
    finally:
        p.close()


def test_mixed_precision_sends_the_compute_dtype_on_the_wire():
    sent = {}
    for mixed in (False, True):
        p = Pipeline(tiny_config(use_mixed_precision=mixed, gradient_accumulation_steps=1))
        try:
            out = p.driver.run_step(0, [synthetic_batch(7)], 1e-3)
            sent[mixed] = (
                out.stage_timings["cpu stage"]["bytes_sent"],
                out.stage_timings["gpu stage"]["bytes_sent"],
            )
            assert all(map(lambda v: v == v, out.micro_batch_losses))  # finite, not NaN
        finally:
            p.close()
    # bf16 activations forward and bf16 gradients back: about half the bytes of fp32 each way.
    for direction in (0, 1):
        assert sent[True][direction] < 0.6 * sent[False][direction], sent


def test_refusals_a_retry_can_cure_carry_a_typed_reason_beside_the_code(pipeline, tmp_path):
    # Recovery decides on the code and this reason (trailing metadata), never on the message.
    from orchestrator.recovery import service_fault

    fresh_srv, port = cpu_server(pipeline.cfg, host="127.0.0.1", port=0)
    fresh = StageClient("cpu stage", f"127.0.0.1:{port}", max_message_mb=64, rpc_timeout=20)
    try:
        refusals = {}
        for name, call in {
            "no run": lambda: fresh.save(pipeline.run_id, 0, str(tmp_path / "a")),
            "other run": lambda: pipeline.cpu.save("another-run", 0, str(tmp_path / "b")),
            "bad checkpoint": lambda: pipeline.cpu.load(pipeline.run_id, 0, str(tmp_path / "missing")),
        }.items():
            with pytest.raises(ServiceError) as info:
                call()
            refusals[name] = info.value
        assert {k: (e.code, e.reason) for k, e in refusals.items()} == {
            "no run": (grpc.StatusCode.FAILED_PRECONDITION, "no_run"),
            "other run": (grpc.StatusCode.FAILED_PRECONDITION, "other_run"),
            "bad checkpoint": (grpc.StatusCode.FAILED_PRECONDITION, None),
        }
        assert [service_fault(e) for e in refusals.values()] == [True, True, False]
    finally:
        fresh.close()
        fresh_srv.stop(0)


def test_every_stage_error_kind_is_exactly_one_grpc_status():
    from redheart.stage.errors import ErrorKind, StageError
    from redheart.stage.wire import STATUS, to_failure

    assert set(STATUS) == set(ErrorKind) and len(set(STATUS.values())) == len(ErrorKind)
    for kind, code in STATUS.items():
        assert to_failure(StageError(kind, "x")).code == code
    with pytest.raises(ValueError):
        StageError("no such kind", "x")  # a kind is one of the enum's, or the error is a bug here
