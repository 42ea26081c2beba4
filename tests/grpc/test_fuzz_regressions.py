"""Targeted regression tests of the bugs the fuzz tests found (see fuzz_support.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from fuzz_requests import _prepush, valid_request
from fuzz_stage_requests import hostile_settings
from fuzz_support import CALL_TIMEOUT, FUZZ, RUN_ID, STAGE_SERVICE, Batch, invoke, judge
from fuzz_values import INF, NP_DTYPES
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import synthetic_batch

from redheart.v1 import stage_pb2, tensor_pb2

pytest_plugins = ["fuzz_support"]  # its fixtures: sandbox, stages, regret

# ----------------------------------------------------------------------------- targeted regressions


def test_save_state_to_unwritable_or_malformed_directories_fails_cleanly(stages):
    """FAILED_PRECONDITION naming the directory (was INTERNAL from an OSError / ValueError)."""
    stages.restore()
    for directory in ("/proc/self", "/dev/null", "/dev/null/x", "a\x00b", "x" * 5000):
        with pytest.raises(grpc.RpcError) as err:
            stages.clients["gpu"].stub.SaveState(
                stage_pb2.SaveStateRequest(run_id=RUN_ID, step=0, directory=directory), timeout=CALL_TIMEOUT
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (directory[:40], err.value.details())
        assert "cannot write the shard" in err.value.details()


def test_load_state_of_a_shard_naming_a_device_file_is_refused_without_reading_it(stages, sandbox):
    """stage.json listing /dev/zero once made the stage read forever (st_size 0 passed the cap)."""
    stages.restore()
    out = sandbox / "devzero"
    shutil.copytree(stages.shards["cpu"], out)
    meta = json.loads((out / "stage.json").read_text())
    meta["files"]["/dev/zero"] = {"bytes": 0, "sha256": "0" * 64}
    (out / "stage.json").write_text(json.dumps(meta))
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stages.clients["cpu"].stub.LoadState(
            stage_pb2.LoadStateRequest(run_id=RUN_ID, step=0, directory=str(out)), timeout=CALL_TIMEOUT
        )
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "must list exactly the files" in err.value.details()
    )
    assert time.monotonic() - start < 2


def test_a_refused_load_leaves_the_stage_unchanged(stages, sandbox):
    """Weights are only replaced once the whole shard (optimizer and RNG too) has been checked."""
    stages.restore()
    before = stages.clients["gpu"].parameters()
    out = sandbox / "half-good"
    shutil.copytree(stages.shards["gpu"], out)
    (out / "rng.safetensors").write_bytes(b"garbage")
    meta = json.loads((out / "stage.json").read_text())
    meta["files"]["rng.safetensors"]["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (out / "stage.json").write_text(json.dumps(meta))
    # Other weights in the shard, so a partial load would show.
    with torch.no_grad():
        for p in stages.runtime("gpu").part.module.parameters():
            p.add_(1.0)
    changed = stages.clients["gpu"].parameters()
    with pytest.raises(grpc.RpcError) as err:
        stages.clients["gpu"].stub.LoadState(
            stage_pb2.LoadStateRequest(run_id=RUN_ID, step=0, directory=str(out)), timeout=CALL_TIMEOUT
        )
    assert (
        err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot be loaded" in err.value.details()
    )
    after = stages.clients["gpu"].parameters()
    for name in before:
        torch.testing.assert_close(after[name], changed[name], rtol=0, atol=0)
    stages.restore()


def test_run_step_with_an_infinite_deadline_is_refused(stages):
    """An infinite wait on the peer would hold the stage's lock forever (until an AbortStep)."""
    stages.restore()
    plan = stage_pb2.StepPlan.FromString(valid_request("RunStep", "gpu", stages))
    for name, value in (("deadline_seconds", INF), ("loss_multiplier", INF), ("loss_scale", INF)):
        bad = stage_pb2.StepPlan()
        bad.CopyFrom(plan)
        setattr(bad, name, value)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            stages.clients["gpu"].stub.RunStep(bad, timeout=CALL_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.value.details()
        assert time.monotonic() - start < 2


def test_start_run_with_non_object_sections_is_invalid_argument(stages):
    """'regret': null (or a list for 'train') was an AttributeError in the GPU part: INTERNAL."""
    stages.restore()
    for text in ('{"regret": null}', '{"regret": 1}', '{"train": [["seed", 0]]}', '{"train": "x"}'):
        for stage in ("cpu", "gpu"):
            req = stages.start_request(stage)
            req.train_settings_json = text
            with pytest.raises(grpc.RpcError) as err:
                stages.clients[stage].stub.StartRun(req, timeout=CALL_TIMEOUT)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (stage, text, err.value.details())
    assert stages.runtime("gpu").run_id == RUN_ID  # a refused StartRun changes nothing
    stages.check_valid_step()


@settings(FUZZ, max_examples=25)
@given(text=st.data())
def test_fuzz_start_run_settings_then_a_real_step(stages, text):
    """Settings a StartRun accepts must not make the next RunStep fail with INTERNAL (loss weights
    that are not numbers, regret counts out of range were accepted and broke every step)."""
    settings_json = text.draw(hostile_settings(stages))
    batch = Batch("StartRun settings + step")
    accepted = []
    for stage in ("cpu", "gpu"):
        req = stages.start_request(stage)
        req.train_settings_json = settings_json
        payload = req.SerializeToString()
        out = invoke(stages.channels[stage], STAGE_SERVICE, "StartRun", payload)
        judge(batch, f"stage:{stage}", "StartRun", "settings+step", payload, out)
        accepted.append(out.code == "OK")
    if all(accepted):
        from orchestrator.pipeline import NonFiniteError, StepFailed

        try:
            stages.driver.run_step(0, [synthetic_batch(0)], 1e-3)
        except StepFailed as exc:
            code = getattr(exc.cause, "code", None)
            if code is None or code.name in ("INTERNAL", "UNKNOWN"):
                batch.problems.append(
                    f"settings {settings_json[:300]!r} accepted, then the step failed: {exc}"
                )
        except NonFiniteError:
            pass  # absurd but well-formed numbers (a huge learning rate...): the orchestrator's own check
    stages.restore()
    batch.report()


GPU_LABEL_CASES = {
    "judgment above the 5 classes": ("labels.judgment", tensor_pb2.INT64, (2,), [0, 7]),
    "judgment below -100": ("labels.judgment", tensor_pb2.INT64, (2,), [0, -101]),
    "judgment [2, 5]": ("labels.judgment", tensor_pb2.INT64, (2, 5), [0] * 10),
    "judgment batch 3": ("labels.judgment", tensor_pb2.INT64, (3,), [0, 1, 2]),
    "emotions [2, 5]": ("labels.emotions", tensor_pb2.FLOAT32, (2, 5), [0.0] * 10),
    "bentham [2, 7]": ("labels.bentham", tensor_pb2.FLOAT32, (2, 7), [0.5] * 14),
    "emotions_mask [3]": ("labels.emotions_mask", tensor_pb2.BOOL, (3,), [1, 1, 1]),
    "bentham_mask [4]": ("labels.bentham_mask", tensor_pb2.BOOL, (4,), [1, 1, 1, 1]),
}


@pytest.mark.parametrize("case", sorted(GPU_LABEL_CASES))
def test_gpu_stage_refuses_malformed_labels_with_invalid_argument(stages, case):
    """Found by this fuzzer (IndexError / ValueError / RuntimeError from the losses: INTERNAL); fixed in
    gpu_stage/logic.py (check_labels). Kept as a regression test."""
    key, dtype, shape, values = GPU_LABEL_CASES[case]
    stages.restore()
    _cpu_plan, plan = stages.driver.step_plans(0, [synthetic_batch(3)])
    arr = np.array(values, dtype=NP_DTYPES[dtype]).reshape(shape)
    plan.micro_batches[1].inputs[key].CopyFrom(
        tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=arr.tobytes(), name=key)
    )
    _prepush(stages, "gpu", plan)  # the activations arrive: the stage gets as far as its losses
    try:
        with pytest.raises(grpc.RpcError) as err:
            stages.clients["gpu"].stub.RunStep(plan, timeout=CALL_TIMEOUT)
    finally:
        stages.abort_all(0)
        stages.wait_idle()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
        f"{err.value.code().name}: {err.value.details()}"
    )
    assert key in err.value.details()


def test_a_run_step_that_legitimately_waits_is_ended_by_abort_step(stages):
    """The one RunStep that may outlive its caller's deadline (the plan allows a long wait on the
    peer) holds the stage until AbortStep, which must end it at once with ABORTED."""
    stages.restore()
    plan = stage_pb2.StepPlan.FromString(valid_request("RunStep", "gpu", stages))
    plan.deadline_seconds = 60.0  # no activation will come: only the abort can end this
    result: dict = {}

    def call() -> None:
        try:
            stages.clients["gpu"].stub.RunStep(plan, timeout=30)
            result["code"] = "OK"
        except grpc.RpcError as exc:
            result["code"], result["details"] = exc.code().name, exc.details()

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 5
    while not stages.runtime("gpu").running.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stages.runtime("gpu").running.is_set()
    start = time.monotonic()
    stages.clients["gpu"].abort(RUN_ID, 0, "fuzz: the orchestrator gave up")
    thread.join(timeout=5)
    assert not thread.is_alive() and time.monotonic() - start < 3
    assert result["code"] == "ABORTED" and "gave up" in result["details"], result
    assert stages.wait_idle()
    stages.check_valid_step()


def test_a_run_cannot_start_where_the_next_step_would_overflow_int64(stages):
    """first_step = 2**63 - 1 was accepted; the first ApplyStep then stepped the optimizer and failed
    with INTERNAL (next_step 2**63 does not fit the int64 field), and so did every Describe after it."""
    for stage in ("cpu", "gpu"):
        req = stages.start_request(stage)
        req.first_step = 2**63 - 1
        with pytest.raises(grpc.RpcError) as err:
            stages.clients[stage].stub.StartRun(req, timeout=CALL_TIMEOUT)
        assert (
            err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "steps go from 0" in err.value.details()
        )
        stages.clients[stage].describe()
    stages.check_valid_step()


def test_abort_marks_are_bounded(stages):
    stages.restore()
    for step in range(1000, 1000 + 600):
        stages.clients["cpu"].abort("other-run", step, "fuzz")
    assert len(stages.runtime("cpu").mailbox._aborted) <= 256
