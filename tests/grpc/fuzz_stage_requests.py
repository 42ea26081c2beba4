"""Hostile stage requests for the fuzz tests: step plans, pushes, StartRun settings, ApplyStep, AbortStep."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from fuzz_support import CPU_KEYS, GPU_KEYS, HIDDEN, RUN_ID, VOCAB, Stages
from fuzz_values import (
    INF,
    NAN,
    NP_DTYPES,
    _values,
    doubles,
    int32s,
    int64s,
    pick_aspects,
    run_ids,
    small_steps,
    tensors,
    texts,
)
from hypothesis import strategies as st

from redheart import codec
from redheart.v1 import stage_pb2, tensor_pb2

# ----------------------------------------------------------------------------- stage requests


LAYOUT = {  # input -> (wire dtype, shape given batch b and positions t, value kind)
    "input_ids": (tensor_pb2.INT64, lambda b, t: (b, t), "ids"),
    "attention_mask": (tensor_pb2.INT64, lambda b, t: (b, t), "mask"),
    "labels.emotions": (tensor_pb2.FLOAT32, lambda b, t: (b, 6), "float"),
    "labels.emotions_mask": (tensor_pb2.BOOL, lambda b, t: (b,), "bool"),
    "labels.bentham": (tensor_pb2.FLOAT32, lambda b, t: (b, 8), "float"),
    "labels.bentham_mask": (tensor_pb2.BOOL, lambda b, t: (b,), "bool"),
    "labels.judgment": (tensor_pb2.INT64, lambda b, t: (b,), "judgment"),
}
HOSTILE_VALUES = {  # in-dtype values a buggy or malicious client could send
    "ids": [-1, VOCAB, VOCAB + 1, 2**40, -(2**63)],
    "mask": [2, -1, 255, 2**62],
    "float": [NAN, INF, -INF, -5.0, 7.0, 1e30],
    "bool": [2, 255],
    "judgment": [5, 6, 99, -1, -101, 2**40, -(2**63)],
}
ALT_DTYPES = {  # other plausible dtypes for each input (a client that forgot a cast)
    "input_ids": [tensor_pb2.INT32, tensor_pb2.FLOAT32, tensor_pb2.UINT8, tensor_pb2.BOOL],
    "attention_mask": [
        tensor_pb2.BOOL,
        tensor_pb2.FLOAT32,
        tensor_pb2.INT32,
        tensor_pb2.FLOAT16,
        tensor_pb2.INT8,
    ],
    "labels.emotions": [
        tensor_pb2.INT64,
        tensor_pb2.FLOAT16,
        tensor_pb2.FLOAT64,
        tensor_pb2.BOOL,
        tensor_pb2.BFLOAT16,
    ],
    "labels.emotions_mask": [tensor_pb2.INT64, tensor_pb2.FLOAT32, tensor_pb2.UINT8],
    "labels.bentham": [tensor_pb2.FLOAT64, tensor_pb2.INT64, tensor_pb2.FLOAT16, tensor_pb2.BFLOAT16],
    "labels.bentham_mask": [tensor_pb2.INT64, tensor_pb2.FLOAT32, tensor_pb2.INT8],
    "labels.judgment": [
        tensor_pb2.INT32,
        tensor_pb2.FLOAT32,
        tensor_pb2.UINT8,
        tensor_pb2.INT8,
        tensor_pb2.BOOL,
    ],
}


def _encode_values(
    dtype: int, shape: tuple[int, ...], kind: str, rng: np.random.Generator, name: str, hostile: bool = False
) -> tensor_pb2.Tensor:
    n = math.prod(shape)
    x = _values(rng, NP_DTYPES[dtype], n, kind, clean=True)
    if kind == "mask" and n and shape[-1]:
        x.reshape(shape)[..., 0] = 1  # every sample keeps one position (as the data pipeline does)
    if hostile and n:
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.array(
                rng.choice(HOSTILE_VALUES.get(kind, [2])), dtype=np.float64 if kind == "float" else np.int64
            )
            x[int(rng.integers(n))] = value.astype(NP_DTYPES[dtype])
    if dtype == tensor_pb2.BOOL:
        x = np.minimum(x, 1) if not hostile else x
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=x.tobytes(), name=name)


def _micro_batch(stage: str, index: int, b: int, t: int, rng: np.random.Generator) -> stage_pb2.MicroBatch:
    mb = stage_pb2.MicroBatch(index=index, sample_ids=[f"fz-{index}-{i}" for i in range(b)])
    for key in CPU_KEYS if stage == "cpu" else GPU_KEYS:
        dtype, shape, kind = LAYOUT[key]
        mb.inputs[key].CopyFrom(_encode_values(dtype, shape(b, t), kind, rng, key))
    return mb


PLAN_ASPECTS = [
    "run_id",
    "step",
    "round",
    "schedule",
    "multiplier",
    "scale",
    "deadline",
    "forward_only",
    "lookahead",
    "indices",
    "empty",
    "many",
    "drop_input",
    "extra_input",
    "tensor",
    "values",
    "values",
    "values",
    "dtype",
    "dtype",
    "shape",
    "shape",
    "mismatch",
    "sample_ids",
    "none",
]


# long: one branch per entry of PLAN_ASPECTS, a menu easier to audit against the list in one place
@st.composite
def hostile_plans(draw, stage: str) -> stage_pb2.StepPlan:
    """A valid plan for the stage's current step (2 samples x 16 positions x 4 micro-batches) with
    one or two hostile aspects, so each example gets past the checks it does not target."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    aspects = pick_aspects(rng, PLAN_ASPECTS)
    b, t, m = 2, 16, 4
    if "shape" in aspects:
        b, t = draw(st.sampled_from([(0, 16), (2, 0), (1, 1), (8, 64), (2, 65), (2, 600), (64, 16), (0, 0)]))
    if "many" in aspects:
        m = 16
    plan = stage_pb2.StepPlan(
        envelope=tensor_pb2.Envelope(run_id=RUN_ID, step=0),
        accumulation_round=0,
        accumulation_steps=1,
        schedule="1f1b",
        loss_multiplier=1.0 / m,
        loss_scale=1.0,
        deadline_seconds=0.05,
    )
    for i in range(m):
        plan.micro_batches.append(_micro_batch(stage, i, b, t, rng))
    mbs = plan.micro_batches
    pick = lambda: mbs[int(rng.integers(len(mbs)))] if len(mbs) else None  # noqa: E731
    keys = list(CPU_KEYS if stage == "cpu" else GPU_KEYS)
    for aspect in aspects:
        if aspect == "run_id":
            plan.envelope.run_id = draw(texts)
        elif aspect == "step":
            plan.envelope.step = draw(st.sampled_from([1, -1, 2**63 - 1, -(2**63), 7]))
        elif aspect == "round":
            plan.accumulation_round, plan.accumulation_steps = draw(
                st.sampled_from(
                    [(1, 1), (-1, 1), (0, 0), (0, -1), (1, 2), (0, 2**31 - 1), (2**31 - 1, 2**31 - 1)]
                )
            )
        elif aspect == "schedule":
            plan.schedule = draw(st.one_of(st.sampled_from(["", "1F1B", "gpipe ", "interleaved"]), texts))
        elif aspect == "multiplier":
            plan.loss_multiplier = draw(doubles)
        elif aspect == "scale":
            plan.loss_scale = draw(doubles)
        elif aspect == "deadline":
            plan.deadline_seconds = draw(
                st.sampled_from([0.0, -1.0, NAN, INF, -INF, 5e-324, 1e308, 30.0, 1e-9])
            )
        elif aspect == "forward_only":
            plan.forward_only = True
            plan.envelope.step = draw(st.sampled_from([1, 0, -1, 2**63 - 1]))
        elif aspect == "lookahead":
            plan.lookahead = draw(st.sampled_from([-1, 1, 4, 5, 2**31 - 1]))
        elif aspect == "indices" and mbs:
            new = draw(st.sampled_from(["dup", "neg", "huge", "shuffle", "gap", "max"]))
            idx = {
                "dup": [0, 0, 1, 2],
                "neg": [-1, 0, 1, 2],
                "huge": [0, 1, 2, 65536],
                "shuffle": [3, 1, 0, 2],
                "gap": [0, 2, 4, 6],
                "max": [2**31 - 1, 0, 1, 2],
            }[new]
            for mb, i in zip(mbs, idx + list(range(4, len(mbs)))):
                mb.index = i
        elif aspect == "empty":
            del plan.micro_batches[:]
        elif aspect == "drop_input" and mbs:
            del pick().inputs[draw(st.sampled_from(keys))]
        elif aspect == "extra_input" and mbs:
            pick().inputs[draw(st.one_of(texts, st.sampled_from(list(LAYOUT))))].CopyFrom(draw(tensors()))
        elif aspect == "tensor" and mbs:
            key = draw(st.sampled_from(keys))
            dtype, shape, kind = LAYOUT[key]
            pick().inputs[key].CopyFrom(draw(tensors(dtype, shape(b, t), kind, name=key)))
        elif aspect == "values" and mbs:
            key = draw(st.sampled_from(keys))
            dtype, shape, kind = LAYOUT[key]
            pick().inputs[key].CopyFrom(_encode_values(dtype, shape(b, t), kind, rng, key, hostile=True))
        elif aspect == "dtype" and mbs:
            key = draw(st.sampled_from(keys))
            _dtype, shape, kind = LAYOUT[key]
            dtype = draw(st.sampled_from(ALT_DTYPES[key]))
            pick().inputs[key].CopyFrom(_encode_values(dtype, shape(b, t), kind, rng, key))
        elif aspect == "mismatch" and mbs:
            key = draw(st.sampled_from(keys))
            dtype, _shape, kind = LAYOUT[key]
            bad = draw(
                st.sampled_from(
                    [(b + 1, t), (b, t + 1), (b, 7), (b, 6, 1), (b, 5), (b, 9), (b * 2,), (max(b - 1, 0), t)]
                )
            )
            pick().inputs[key].CopyFrom(_encode_values(dtype, bad, kind, rng, key))
        elif aspect == "sample_ids" and mbs:
            pick().sample_ids[:] = draw(st.lists(texts, max_size=5))
    return plan


def _tensor_transfer(
    stage: str, step: int = 0, micro_batch: int = 0, shape=(2, 16, HIDDEN)
) -> stage_pb2.TensorTransfer:
    kind = tensor_pb2.ACTIVATION if stage == "gpu" else tensor_pb2.GRADIENT
    return stage_pb2.TensorTransfer(
        envelope=tensor_pb2.Envelope(run_id=RUN_ID, step=step, micro_batch=micro_batch, kind=kind),
        tensor=codec.encode(torch.randn(*shape) * 0.1),
        sender="fuzz",
    )


@st.composite
def hostile_pushes(draw, stage: str) -> stage_pb2.TensorTransfer:
    req = _tensor_transfer(stage, 0, draw(st.integers(0, 7)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    [aspect] = pick_aspects(
        rng,
        [
            "run_id",
            "step",
            "micro_batch",
            "kind",
            "sender",
            "tensor",
            "tensor",
            "tensor",
            "shape",
            "shape",
            "codec",
            "values",
            "none",
        ],
        most=1,
    )
    if aspect == "run_id":
        req.envelope.run_id = draw(texts)
    elif aspect == "step":
        req.envelope.step = draw(st.sampled_from([1, -1, 2**63 - 1, -(2**63), 1 << 40]))
    elif aspect == "micro_batch":
        req.envelope.micro_batch = draw(int32s)
    elif aspect == "kind":
        req.envelope.kind = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1]), int32s))
    elif aspect == "sender":
        req.sender = draw(texts)
    elif aspect == "tensor":
        req.tensor.CopyFrom(draw(tensors(tensor_pb2.FLOAT32, (2, 16, HIDDEN), "float")))
    elif aspect == "shape":
        shape = draw(
            st.sampled_from(
                [
                    (0, 16, HIDDEN),
                    (2, 0, HIDDEN),
                    (1, 600, HIDDEN),
                    (2, 16, 0),
                    (2, 16),
                    (2, 16, HIDDEN, 1),
                    (64, 64, HIDDEN),
                    (2, 16, HIDDEN * 2),
                ]
            )
        )
        dtype = draw(
            st.sampled_from(
                [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.bool]
            )
        )
        req.tensor.CopyFrom(codec.encode(torch.zeros(shape).to(dtype)))
    elif aspect == "codec":
        req.tensor.CopyFrom(
            codec.encode(torch.randn(2, 16, HIDDEN), codec=draw(st.sampled_from(["fp16", "bf16", "int8"])))
        )
    elif aspect == "values":
        req.tensor.CopyFrom(
            codec.encode(torch.full((2, 16, HIDDEN), draw(st.sampled_from([NAN, INF, -INF, 1e38]))))
        )
    return req


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
TRAIN_KEYS = [
    "seed",
    "learning_rate",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "use_mixed_precision",
    "loss_weights",
    "schedule",
    "max_grad_norm",
]


@st.composite
def hostile_settings(draw, stages: Stages) -> str:
    mode = draw(st.sampled_from(["json", "sections", "train", "regret", "text"]))
    if mode == "text":
        return draw(
            st.one_of(
                texts, st.sampled_from(["{", "[]", "null", "1", '"x"', "NaN", "{" * 5000, "[" * 100000])
            )
        )
    if mode == "json":
        return json.dumps(draw(JSON_VALUES))
    settings_ = json.loads(json.dumps(stages.settings))
    if mode == "sections":
        settings_[draw(st.sampled_from(["train", "regret", "empty_cache_every"]))] = draw(JSON_VALUES)
    elif mode == "train":
        settings_["train"][draw(st.sampled_from(TRAIN_KEYS))] = draw(JSON_VALUES)
    else:
        settings_["regret"][
            draw(st.sampled_from(["enabled", "regrets_per_step", "bentham_per_regret", "timeout_seconds"]))
        ] = draw(JSON_VALUES)
    return json.dumps(settings_)


@st.composite
def hostile_start(draw, stage: str, stages: Stages) -> stage_pb2.StartRunRequest:
    req = stages.start_request(stage)
    req.run_id = draw(st.one_of(st.just(RUN_ID), texts))
    if draw(st.booleans()):
        req.train_settings_json = draw(hostile_settings(stages))
    addresses = st.one_of(
        st.just(""),
        texts,
        st.sampled_from(
            [
                "127.0.0.1:1",
                "unix:/nonexistent",
                "dns:///x:99999",
                "[::1]:0",
                "ipv4:999.1.1.1:1",
                "garbage:::://",
            ]
        ),
    )
    for name in ("next_stage_address", "prev_stage_address", "regret_address"):
        if draw(st.integers(0, 3)) == 0:
            setattr(req, name, draw(addresses))
    req.first_step = draw(st.one_of(st.just(0), int64s))
    req.reinitialize = draw(st.booleans())
    return req


@st.composite
def hostile_applies(draw) -> stage_pb2.ApplyRequest:
    req = stage_pb2.ApplyRequest(
        envelope=tensor_pb2.Envelope(run_id=RUN_ID, step=0),
        clip_coefficient=1.0,
        learning_rate=1e-3,
        loss_scale=1.0,
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for aspect in pick_aspects(rng, ["run_id", "step", "clip", "clip", "lr", "lr", "skip", "scale", "scale"]):
        if aspect == "run_id":
            req.envelope.run_id = draw(texts)
        elif aspect == "step":
            req.envelope.step = draw(st.sampled_from([1, -1, 2**63 - 1, -(2**63)]))
        elif aspect == "clip":
            req.clip_coefficient = draw(doubles)
        elif aspect == "lr":
            req.learning_rate = draw(doubles)
        elif aspect == "skip":
            req.skip = True
        else:
            req.loss_scale = draw(doubles)
    return req


@st.composite
def hostile_aborts(draw) -> stage_pb2.AbortRequest:
    return stage_pb2.AbortRequest(run_id=draw(run_ids), step=draw(small_steps), reason=draw(texts))
