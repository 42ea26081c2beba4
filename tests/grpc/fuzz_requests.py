"""Hostile SaveState / LoadState requests (corrupt shards) and the per-method dispatch of the stage fuzz."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import grpc
from fuzz_stage_requests import (
    JSON_VALUES,
    _tensor_transfer,
    hostile_aborts,
    hostile_applies,
    hostile_plans,
    hostile_pushes,
    hostile_start,
)
from fuzz_support import (
    CALL_TIMEOUT,
    HIDDEN,
    RUN_ID,
    SKIPPED,
    STAGE_SERVICE,
    WAIT_TIMEOUT,
    Batch,
    Stages,
    _parses,
    _short,
    invoke,
    judge,
)
from fuzz_values import run_ids, small_steps, texts
from hypothesis import strategies as st
from synthetic import synthetic_batch

from redheart.v1 import stage_pb2, tensor_pb2

SAVE_PATHS = [
    "../../etc",
    "../../../../../../../../../x",
    "/proc/self",
    "/proc/self/fd/0",
    "/dev/null",
    "/dev/null/x",
    "a\x00b",
    "x" * 5000,
    ("d/" * 2100),
    ".",
    "..",
    "save/../save/ok",
    "~",
    "\u202esave",
    "save/😀",
    "/etc",
    "/",
    "/tmp",
    "../../../../../../../../../../../../etc/cron.d",
]
# Directories where a write fails for every user, root included: safe to send from any CI user.
UNWRITABLE = {"/proc/self", "/proc/self/fd/0", "/dev/null", "/dev/null/x"}


@st.composite
def hostile_saves(draw, sandbox: Path) -> stage_pb2.SaveStateRequest:
    directory = draw(
        st.one_of(
            st.sampled_from(SAVE_PATHS),
            st.builds(lambda s: f"save/{s}", texts),
            st.just(str(sandbox / "save" / "abs")),
        )
    )
    return stage_pb2.SaveStateRequest(
        run_id=draw(run_ids), step=draw(st.one_of(st.just(0), small_steps)), directory=directory
    )


def write_allowed(stages: Stages, stage: str, payload: bytes) -> bool:
    """Would this SaveState write somewhere outside the sandbox? (Then it is not sent.)"""
    req = _parses("SaveState", payload)
    rt = stages.runtime(stage)
    if req is None or req.run_id != rt.run_id or req.step != rt.next_step or not req.directory:
        return True  # refused before the disk is touched
    if "\x00" in req.directory or req.directory in UNWRITABLE:
        return True
    try:
        resolved = Path(os.path.abspath(os.path.expanduser(req.directory))).resolve()
    except (OSError, ValueError, RuntimeError):
        return True
    return resolved.is_relative_to(stages.sandbox.resolve())


# long: one branch per way a checkpoint directory can be corrupt, read together with the loader
@st.composite
def garbage_shards(draw, stage: str, stages: Stages, counter=[0]) -> str:  # noqa: B006 - a shared counter on purpose
    """A checkpoint directory in the sandbox whose stage.json and files are corrupt in one way."""
    counter[0] += 1
    real = stages.shards[stage]
    out = stages.sandbox / "garbage" / f"{stage}-{counter[0]}"
    out.mkdir(parents=True)
    meta = json.loads((real / "stage.json").read_text())
    files = {
        f: (real / f).read_bytes()
        for f in ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")
    }
    mode = draw(
        st.sampled_from(
            ["meta-bytes", "meta-json", "meta-field", "file-bytes", "file-sha", "file-kind", "names", "valid"]
        )
    )
    stage_json: bytes | None = None
    if mode == "meta-bytes":
        stage_json = draw(
            st.one_of(
                st.binary(max_size=64), st.sampled_from([b"[" * 100000, b"\xff\xfe{}", b'{"step": 1e999}'])
            )
        )
    elif mode == "meta-json":
        stage_json = json.dumps(draw(JSON_VALUES)).encode()
    elif mode == "meta-field":
        key = draw(
            st.sampled_from(["step", "files", "optimizer", "model_fingerprint", "model_settings", "run_id"])
        )
        path = {
            "optimizer": draw(st.sampled_from([None, "steps", "param_groups"])),
            "files": draw(st.sampled_from([None, "weights.safetensors"])),
        }.get(key)
        target = meta if path is None else meta[key]
        slot = key if path is None else path
        target[slot] = draw(
            st.one_of(JSON_VALUES, st.sampled_from([0, 1, -1, 1.5, True, "0", 2**70, None, [], {}]))
        )
    elif mode in ("file-bytes", "file-sha"):
        name = draw(st.sampled_from(sorted(files)))
        data = draw(
            st.one_of(
                st.binary(max_size=64),
                st.just(files[name][: len(files[name]) // 2]),
                st.just(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}'),
                st.just(struct.pack("<Q", 2**60) + b"{}"),
            )
        )
        files[name] = data
        if mode == "file-sha":  # a matching sha256: the safetensors parser gets the garbage
            meta["files"][name]["sha256"] = hashlib.sha256(data).hexdigest()
    elif mode == "names":
        bad = draw(
            st.sampled_from(
                [
                    "/dev/zero",
                    "/dev/urandom",
                    "../../../../../../etc/passwd",
                    "/proc/self/environ",
                    "",
                    ".",
                    "sub/x",
                ]
            )
        )
        meta["files"] = {bad: {"bytes": 0, "sha256": "0" * 64}, **meta["files"]}
    for f, data in files.items():
        if mode == "file-kind" and f == "weights.safetensors":
            kind = draw(st.sampled_from(["dir", "zero", "fifo", "missing"]))
            if kind == "dir":
                (out / f).mkdir()
            elif kind == "zero":
                os.symlink("/dev/zero", out / f)
            elif kind == "fifo":
                os.mkfifo(out / f)
            continue
        if data == (real / f).read_bytes():
            os.link(real / f, out / f)
        else:
            (out / f).write_bytes(data)
    (out / "stage.json").write_bytes(stage_json if stage_json is not None else json.dumps(meta).encode())
    return str(out)


@st.composite
def hostile_loads(draw, stage: str, stages: Stages) -> stage_pb2.LoadStateRequest:
    directory = draw(
        st.one_of(
            st.sampled_from(
                [
                    "../../etc",
                    "/proc/self",
                    "/etc",
                    "/",
                    "/dev/zero",
                    "/dev/null",
                    "a\x00b",
                    "x" * 5000,
                    "/nonexistent/shard",
                    "",
                    ".",
                    str(stages.shards["gpu" if stage == "cpu" else "cpu"]),
                ]
            ),
            garbage_shards(stage, stages),
            garbage_shards(stage, stages),
        )
    )
    return stage_pb2.LoadStateRequest(
        run_id=draw(run_ids), step=draw(st.one_of(st.just(0), st.just(0), small_steps)), directory=directory
    )


unknown_fields = st.builds(
    lambda f, v: bytes([(f << 3) | 0]) + bytes([v]), st.integers(1, 15), st.integers(0, 127)
)
EMPTY_HOSTILE = st.one_of(
    unknown_fields,
    st.just(b"\x0a\x00"),
    st.just(b"\x12\x03abc" * 200),
    st.builds(lambda n: b"\xfa\x07" + bytes([n]) + b"x" * n, st.integers(0, 127)),
)


def hostile_requests(method: str, stage: str, stages: Stages) -> st.SearchStrategy:
    """Structurally valid requests with hostile fields, serialized."""
    ser = lambda s: s.map(lambda m: m.SerializeToString())  # noqa: E731
    return {
        "Describe": EMPTY_HOSTILE,
        "GetParameters": EMPTY_HOSTILE,
        "StartRun": ser(hostile_start(stage, stages)),
        "RunStep": ser(hostile_plans(stage)),
        "ApplyStep": ser(hostile_applies()),
        "AbortStep": ser(hostile_aborts()),
        "PushTensor": ser(hostile_pushes(stage)),
        "SaveState": ser(hostile_saves(stages.sandbox)),
        "LoadState": ser(hostile_loads(stage, stages)),
    }[method]


def valid_request(method: str, stage: str, stages: Stages) -> bytes:
    plan_cpu, plan_gpu = stages.driver.step_plans(0, [synthetic_batch(2)])
    plan = plan_cpu if stage == "cpu" else plan_gpu
    plan.deadline_seconds = 0.1
    return {
        "Describe": stage_pb2.DescribeRequest(),
        "GetParameters": stage_pb2.GetParametersRequest(),
        "StartRun": stages.start_request(stage),
        "RunStep": plan,
        "ApplyStep": stage_pb2.ApplyRequest(
            envelope=tensor_pb2.Envelope(run_id=RUN_ID, step=0),
            clip_coefficient=1.0,
            learning_rate=1e-3,
            loss_scale=1.0,
        ),
        "AbortStep": stage_pb2.AbortRequest(run_id=RUN_ID, step=0, reason="fuzz"),
        "PushTensor": _tensor_transfer(stage),
        "SaveState": stage_pb2.SaveStateRequest(run_id=RUN_ID, step=0, directory="save/base"),
        "LoadState": stage_pb2.LoadStateRequest(run_id=RUN_ID, step=0, directory=str(stages.shards[stage])),
    }[method].SerializeToString()


def _prepush(stages: Stages, stage: str, plan: stage_pb2.StepPlan) -> None:
    """Deliver the peer's tensors of a plan ahead, so the stage computes instead of waiting."""
    for mb in plan.micro_batches:
        mask = mb.inputs["attention_mask"] if "attention_mask" in mb.inputs else None
        shape = (
            tuple(mask.shape)
            if mask is not None and len(mask.shape) == 2 and all(0 <= d <= 600 for d in mask.shape)
            else (2, 16)
        )
        if not 0 <= mb.index < 65536:
            continue
        request = _tensor_transfer(stage, 0, mb.index, shape + (HIDDEN,))
        try:
            stages.clients[stage].stub.PushTensor(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError:
            pass  # refused (e.g. an empty shape): the plan then waits for it, briefly


def send_stage(stages: Stages, batch: Batch, stage: str, method: str, strategy: str, payload: bytes) -> None:
    channel = stages.channels[stage]
    target = f"stage:{stage}"
    if method == "SaveState" and not write_allowed(stages, stage, payload):
        SKIPPED[(stage, strategy)] += 1
        return
    if method == "ApplyStep" and stages.runtime(stage).rounds_done == 0:
        stages.prime()
    plan = _parses("RunStep", payload) if method == "RunStep" else None
    legit = bool(plan is not None and plan.deadline_seconds > WAIT_TIMEOUT and plan.envelope.run_id == RUN_ID)
    if (
        plan is not None
        and not plan.forward_only
        and plan.envelope.step == 0
        and len(plan.micro_batches) <= 8
    ):
        _prepush(stages, stage, plan)
    out = invoke(channel, STAGE_SERVICE, method, payload, timeout=WAIT_TIMEOUT if legit else CALL_TIMEOUT)
    judge(batch, target, method, strategy, payload, out, legit_wait=legit)
    if method == "RunStep":
        # What the orchestrator does after any failed or abandoned round: abort it everywhere.
        stages.abort_all(plan.envelope.step if plan is not None else 0)
        if plan is not None and plan.envelope.step != 0:
            stages.abort_all(0)
        if not stages.wait_idle():
            batch.problems.append(
                f"HANG: {stage} stage still running 3 s after AbortStep: RunStep [{strategy}] payload {_short(payload)}"
            )
