"""Hypothesis strategies of hostile values, tensors and byte mutations for the fuzz tests (see fuzz_support.py)."""

from __future__ import annotations

import math
import struct

import numpy as np
from fuzz_support import HIDDEN, RUN_ID, VOCAB
from hypothesis import strategies as st

from redheart.v1 import tensor_pb2

# ----------------------------------------------------------------------------- strategies: values

NAN, INF = float("nan"), float("inf")
HOSTILE_DOUBLES = [NAN, INF, -INF, 0.0, -0.0, -1.0, 5e-324, 1e-308, 1e308, 1.7976931348623157e308, 1e9]
HOSTILE_INT32 = [0, 1, -1, 2, 7, 2**31 - 1, -(2**31), 65535, 65536]
HOSTILE_INT64 = [0, 1, -1, 2, 2**31, 2**62, 2**63 - 1, -(2**63), 1 << 40]
HOSTILE_TEXT = [
    "",
    RUN_ID,
    RUN_ID + "\x00",
    RUN_ID.upper(),
    "\u202e" + RUN_ID,
    "x" * 5000,
    "😀" * 20,
    "../../etc/passwd",
    "%s%n{0}",
    "\x00",
]

int32s = st.one_of(st.sampled_from(HOSTILE_INT32), st.integers(-(2**31), 2**31 - 1))
int64s = st.one_of(st.sampled_from(HOSTILE_INT64), st.integers(-(2**63), 2**63 - 1))
small_steps = st.one_of(st.just(0), st.sampled_from(HOSTILE_INT64), st.integers(-3, 5))
doubles = st.one_of(st.sampled_from(HOSTILE_DOUBLES), st.floats(allow_nan=True, allow_infinity=True))
texts = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40))
run_ids = st.one_of(st.just(RUN_ID), st.just(RUN_ID), texts)

# Wire dtype code -> (numpy dtype, item size); bfloat16 travels as 16-bit words.
NP_DTYPES = {
    tensor_pb2.FLOAT32: np.float32,
    tensor_pb2.FLOAT16: np.float16,
    tensor_pb2.BFLOAT16: np.int16,
    tensor_pb2.INT64: np.int64,
    tensor_pb2.INT32: np.int32,
    tensor_pb2.UINT8: np.uint8,
    tensor_pb2.BOOL: np.uint8,
    tensor_pb2.FLOAT64: np.float64,
    tensor_pb2.INT8: np.int8,
}
HOSTILE_SHAPES = [
    [],
    [0],
    [-1],
    [2, -16, 64],
    [2**31, 2**31],
    [2**62, 4],
    [2**63 - 1],
    [1] * 9,
    [1] * 64,
    [0, 16, HIDDEN],
    [0, 2**31, 2**31],
    [2, 16, HIDDEN + 1],
    [2, 16],
    [2, 0, HIDDEN],
    [1, 1, 1, 1],
]


def _values(rng: np.random.Generator, np_dtype, n: int, kind: str, clean: bool = False) -> np.ndarray:
    """n values of a dtype: in range for `kind`, with occasional hostile ones mixed in (unless clean)."""
    if np.issubdtype(np_dtype, np.floating):
        x = rng.random(n).astype(np_dtype)
        if kind == "valence":
            x = x * 2 - 1
        with np.errstate(over="ignore", invalid="ignore"):
            hostile = np.array([np.nan, np.inf, -np.inf, -1.0, 2.0, 1e30, -0.0], dtype=np.float64).astype(
                np_dtype
            )
    else:
        info = np.iinfo(np_dtype)
        hi = {"ids": VOCAB, "mask": 2, "judgment": 5, "bool": 2}.get(kind, 100)
        x = rng.integers(0, min(hi, int(info.max) + 1), n).astype(np_dtype)
        if kind == "judgment" and info.min <= -100:
            x[rng.random(n) < 0.2] = -100
        hostile = np.array(
            [info.min, info.max, -1, hi, hi + 7, -100 if info.min < -100 else 0], dtype=np.int64
        ).astype(np_dtype)
    if n and not clean and rng.random() < 0.35:
        k = int(rng.integers(1, min(n, 4) + 1))
        x[rng.integers(0, n, k)] = rng.choice(hostile, k)
    return x


@st.composite
def tensors(
    draw,
    dtype: int = tensor_pb2.FLOAT32,
    shape: tuple[int, ...] = (2, 16, HIDDEN),
    kind: str = "float",
    name: str = "",
) -> tensor_pb2.Tensor:
    """A Tensor message shaped like (dtype, shape), or a hostile variant of it."""
    mode = draw(st.sampled_from(["valid", "valid", "valid", "dtype", "shape", "length", "codec", "garbage"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = list(shape)
    if mode == "dtype":
        dtype = draw(st.one_of(st.sampled_from(sorted(NP_DTYPES)), st.integers(-5, 40), int32s))
    elif mode == "shape":
        shape = draw(
            st.one_of(
                st.sampled_from(HOSTILE_SHAPES),
                st.lists(st.integers(0, 6), max_size=5),
                st.lists(int64s, min_size=1, max_size=4),
            )
        )
    msg = tensor_pb2.Tensor(
        dtype=dtype, shape=shape, name=draw(st.sampled_from([name, "", "x" * 300, "\u202e"]))
    )
    numel = math.prod(shape) if all(0 <= d <= 4096 for d in shape) else -1
    np_dtype = NP_DTYPES.get(dtype)
    if mode == "garbage" or np_dtype is None or not 0 <= numel <= 1 << 16:
        msg.data = draw(st.binary(max_size=64))
    elif mode == "codec":
        msg.codec = draw(st.one_of(st.sampled_from([1, 2, 3]), int32s))
        msg.block_size = draw(st.sampled_from([0, 1, 7, 256, 1 << 20, (1 << 20) + 1, 2**32 - 1]))
        nbytes = draw(st.sampled_from([numel, numel * 2, numel * 4, 0, numel + 1]))
        msg.data = rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes()
        msg.scales = draw(
            st.one_of(
                st.binary(max_size=16),
                st.just(struct.pack("<f", NAN) * 4),
                st.just(struct.pack("<f", 1.0) * max(1, math.ceil(numel / max(1, msg.block_size or 1)))),
            )
        )
    else:
        data = _values(rng, np_dtype, numel, kind).tobytes()
        if mode == "length":
            data = draw(st.sampled_from([data[:-1], data + b"\x00", data[: len(data) // 2], b"", data * 2]))
        msg.data = data
    return msg


MUTATION_OPS = ["flip"] * 8 + ["set"] * 5 + ["delete"] * 2 + ["insert"] * 2 + ["duplicate"] * 2 + ["truncate"]


def mutations() -> st.SearchStrategy:
    """A seed: the number of edits, their kinds, positions and bytes come from a numpy generator, so
    they are spread over the message instead of piling up at offset 0 as hypothesis' simplest values
    do. About half of the mutants still parse (semantic damage), the rest test the parser."""
    return st.integers(0, 2**32 - 1)


def mutate(base: bytes, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    edits = int(rng.choice([1, 1, 1, 1, 2, 3, 4]))
    b = bytearray(base)
    for _ in range(edits):
        op = MUTATION_OPS[int(rng.integers(len(MUTATION_OPS)))]
        n = int(rng.integers(1, 9))
        pos = int(rng.integers(0, len(b) + 1))
        if op == "insert" or not b:
            b[pos:pos] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            continue
        pos = min(pos, len(b) - 1)
        if op == "flip":
            b[pos] ^= 1 << int(rng.integers(8))
        elif op == "set":
            b[pos] = int(rng.integers(256))
        elif op == "delete":
            del b[pos : pos + n]
        elif op == "duplicate":
            b[pos:pos] = b[pos : pos + n]
        else:
            del b[max(1, pos) :]
    return bytes(b)


def pick_aspects(rng: np.random.Generator, menu: list[str], most: int = 2) -> list[str]:
    """One (or up to `most`) hostile aspects, uniformly: hypothesis' own choices cluster on the first."""
    k = 1 if most == 1 or rng.random() < 0.7 else most
    return list(dict.fromkeys(menu[int(i)] for i in rng.integers(0, len(menu), k)))


random_payloads = st.one_of(st.binary(max_size=48), st.binary(min_size=48, max_size=2048))
