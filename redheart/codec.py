"""The one place where tensors become protobuf messages and back.

Every process encodes with :func:`encode` and decodes with :func:`decode`; ``decode`` validates
everything it receives before touching the bytes, because a message can come from any peer on
the network: dtype allow-list, rank and dimension limits, an element count that cannot overflow,
and an exact byte length. Violations raise :class:`TensorValidationError`, which servicers turn
into ``INVALID_ARGUMENT`` with the message unchanged.

Codecs (what ``data`` holds on the wire; the receiver always rebuilds ``dtype``):

* ``raw``  – the values themselves, little-endian;
* ``fp16`` / ``bf16`` – 16-bit floats, half the bytes of float32;
* ``int8`` – blockwise absmax quantisation: one float32 scale per ``block_size`` values and one
  signed byte per value (about 4x smaller than float32, error <= absmax/254 per block).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from redheart.v1 import tensor_pb2

__all__ = [
    "TensorLimits",
    "TensorValidationError",
    "decode",
    "encode",
    "encoded_nbytes",
    "CODECS",
]


class TensorValidationError(ValueError):
    """A received tensor message is malformed; the text names the tensor and the problem."""


@dataclass(frozen=True)
class TensorLimits:
    """Bounds a received tensor must respect. Defaults fit the 200M preset with room to spare."""

    max_rank: int = 8
    max_dim: int = 1 << 31
    max_elements: int = 1 << 31
    max_bytes: int = 1 << 31
    allowed_dtypes: frozenset[str] = frozenset(
        {"float32", "float16", "bfloat16", "int64", "int32", "uint8", "bool", "float64", "int8"}
    )


DEFAULT_LIMITS = TensorLimits()

_TORCH_TO_WIRE = {
    torch.float32: tensor_pb2.FLOAT32,
    torch.float16: tensor_pb2.FLOAT16,
    torch.bfloat16: tensor_pb2.BFLOAT16,
    torch.int64: tensor_pb2.INT64,
    torch.int32: tensor_pb2.INT32,
    torch.uint8: tensor_pb2.UINT8,
    torch.bool: tensor_pb2.BOOL,
    torch.float64: tensor_pb2.FLOAT64,
    torch.int8: tensor_pb2.INT8,
}
_WIRE_TO_TORCH = {v: k for k, v in _TORCH_TO_WIRE.items()}
_WIRE_NAME = {
    tensor_pb2.FLOAT32: "float32",
    tensor_pb2.FLOAT16: "float16",
    tensor_pb2.BFLOAT16: "bfloat16",
    tensor_pb2.INT64: "int64",
    tensor_pb2.INT32: "int32",
    tensor_pb2.UINT8: "uint8",
    tensor_pb2.BOOL: "bool",
    tensor_pb2.FLOAT64: "float64",
    tensor_pb2.INT8: "int8",
}
_ITEMSIZE = {
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.int64: 8,
    torch.int32: 4,
    torch.uint8: 1,
    torch.bool: 1,
    torch.float64: 8,
    torch.int8: 1,
}

CODECS = {
    "raw": tensor_pb2.CODEC_RAW,
    "fp16": tensor_pb2.CODEC_FP16,
    "bf16": tensor_pb2.CODEC_BF16,
    "int8": tensor_pb2.CODEC_INT8_BLOCKWISE,
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DEFAULT_BLOCK_SIZE = 256

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("redheart.codec assumes a little-endian host")


def _raw_bytes(t: torch.Tensor) -> bytes:
    # bfloat16 has no numpy dtype: reinterpret the 16-bit words as int16, which keeps the bits.
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def encode(
    tensor: torch.Tensor,
    *,
    codec: str = "raw",
    name: str = "",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tensor_pb2.Tensor:
    """Tensor -> message. Detaches and copies to host memory; never keeps a graph alive."""
    if tensor.dtype not in _TORCH_TO_WIRE:
        raise TypeError(f"tensor {name or '<unnamed>'}: dtype {tensor.dtype} has no wire encoding")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {sorted(CODECS)}")
    if codec != "raw" and tensor.dtype not in _FLOATS:
        codec = "raw"  # integer tensors (token ids, labels) are never lossy-encoded
    msg = tensor_pb2.Tensor(
        dtype=_TORCH_TO_WIRE[tensor.dtype],
        shape=list(tensor.shape),
        codec=CODECS[codec],
        name=name,
    )
    if codec == "raw":
        msg.data = _raw_bytes(tensor)
    elif codec == "fp16":
        msg.data = _raw_bytes(tensor.to(torch.float16))
    elif codec == "bf16":
        msg.data = _raw_bytes(tensor.to(torch.bfloat16))
    else:
        codes, scales = _quantize_int8(tensor, block_size)
        msg.data = codes
        msg.scales = scales
        msg.block_size = block_size
    return msg


def _quantize_int8(tensor: torch.Tensor, block_size: int) -> tuple[bytes, bytes]:
    flat = tensor.detach().reshape(-1).to(torch.float32).cpu()
    n = flat.numel()
    blocks = math.ceil(n / block_size) if n else 0
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)
    padded[:n] = flat
    padded = padded.view(blocks, block_size)  # [blocks, block_size]
    scales = padded.abs().amax(dim=1).clamp_min(1e-12)  # [blocks]
    codes = torch.round(padded / scales[:, None] * 127.0).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[:n].numpy().tobytes(), scales.numpy().tobytes()


def _fail(msg: tensor_pb2.Tensor, what: str) -> TensorValidationError:
    label = msg.name or "<unnamed>"
    return TensorValidationError(f"tensor '{label}': {what}")


def _checked_numel(msg: tensor_pb2.Tensor, limits: TensorLimits) -> int:
    shape = list(msg.shape)
    if len(shape) > limits.max_rank:
        raise _fail(msg, f"rank {len(shape)} exceeds the limit of {limits.max_rank}")
    numel = 1
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise _fail(msg, f"dimension {axis} is negative ({dim})")
        if dim > limits.max_dim:
            raise _fail(msg, f"dimension {axis} is {dim}, above the limit of {limits.max_dim}")
        # Python ints do not overflow, but we stop early so an absurd shape costs nothing.
        numel *= dim
        if numel > limits.max_elements:
            raise _fail(msg, f"shape {shape} holds more than {limits.max_elements} elements")
    return numel


def decode(
    msg: tensor_pb2.Tensor,
    *,
    limits: TensorLimits = DEFAULT_LIMITS,
    expect_dtype: torch.dtype | None = None,
    expect_rank: int | None = None,
) -> torch.Tensor:
    """Message -> tensor, after validating it. Raises TensorValidationError naming the problem."""
    if msg.dtype not in _WIRE_TO_TORCH:
        raise _fail(msg, f"unknown dtype code {msg.dtype}")
    dtype = _WIRE_TO_TORCH[msg.dtype]
    if _WIRE_NAME[msg.dtype] not in limits.allowed_dtypes:
        raise _fail(msg, f"dtype {_WIRE_NAME[msg.dtype]} is not allowed here")
    if expect_dtype is not None and dtype != expect_dtype:
        raise _fail(
            msg, f"dtype is {_WIRE_NAME[msg.dtype]}, expected {str(expect_dtype).removeprefix('torch.')}"
        )
    if expect_rank is not None and len(msg.shape) != expect_rank:
        raise _fail(msg, f"rank is {len(msg.shape)} (shape {list(msg.shape)}), expected {expect_rank}")
    numel = _checked_numel(msg, limits)
    shape = tuple(msg.shape)
    codec = msg.codec
    if codec == tensor_pb2.CODEC_RAW:
        wire_dtype, itemsize = dtype, _ITEMSIZE[dtype]
    elif codec in (tensor_pb2.CODEC_FP16, tensor_pb2.CODEC_BF16):
        if dtype not in _FLOATS:
            raise _fail(
                msg, f"codec {tensor_pb2.Codec.Name(codec)} needs a float dtype, got {_WIRE_NAME[msg.dtype]}"
            )
        wire_dtype = torch.float16 if codec == tensor_pb2.CODEC_FP16 else torch.bfloat16
        itemsize = 2
    elif codec == tensor_pb2.CODEC_INT8_BLOCKWISE:
        if dtype not in _FLOATS:
            raise _fail(msg, f"codec CODEC_INT8_BLOCKWISE needs a float dtype, got {_WIRE_NAME[msg.dtype]}")
        return _decode_int8(msg, dtype, shape, numel, limits)
    else:
        raise _fail(msg, f"unknown codec code {codec}")
    expected = numel * itemsize
    if expected > limits.max_bytes:
        raise _fail(msg, f"{expected} bytes exceeds the limit of {limits.max_bytes}")
    if len(msg.data) != expected:
        raise _fail(
            msg,
            f"byte length {len(msg.data)} does not match shape {list(shape)} x "
            f"{str(wire_dtype).removeprefix('torch.')} ({expected} bytes)",
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    if wire_dtype == torch.bfloat16:
        words = np.frombuffer(msg.data, dtype=np.int16)
        out = torch.from_numpy(words.copy()).view(torch.bfloat16)
    elif wire_dtype == torch.bool:
        raw = np.frombuffer(msg.data, dtype=np.uint8)
        if raw.max(initial=0) > 1:
            raise _fail(msg, "bool tensor holds bytes other than 0 and 1")
        out = torch.from_numpy(raw.astype(np.bool_))
    else:
        np_dtype = torch.empty((), dtype=wire_dtype).numpy().dtype
        # copy(): frombuffer views the immutable message bytes; torch needs a writable buffer.
        out = torch.from_numpy(np.frombuffer(msg.data, dtype=np_dtype).copy())
    out = out.reshape(shape)  # [*shape]
    return out if out.dtype == dtype else out.to(dtype)


def _decode_int8(msg, dtype, shape, numel, limits) -> torch.Tensor:
    block = msg.block_size
    if block <= 0 or block > (1 << 20):
        raise _fail(msg, f"block_size {block} must be in 1..{1 << 20}")
    blocks = math.ceil(numel / block) if numel else 0
    if len(msg.data) != numel:
        raise _fail(
            msg, f"byte length {len(msg.data)} does not match {numel} int8 codes for shape {list(shape)}"
        )
    if len(msg.scales) != blocks * 4:
        raise _fail(
            msg, f"scales hold {len(msg.scales)} bytes, expected {blocks * 4} ({blocks} float32 blocks)"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    codes = torch.from_numpy(np.frombuffer(msg.data, dtype=np.int8).astype(np.float32))
    scales = torch.from_numpy(np.frombuffer(msg.scales, dtype=np.float32).copy())
    if not torch.isfinite(scales).all():
        raise _fail(msg, "int8 block scales contain inf or NaN")
    padded = torch.zeros(blocks * block, dtype=torch.float32)
    padded[:numel] = codes
    values = padded.view(blocks, block) * (scales[:, None] / 127.0)  # [blocks, block]
    return values.reshape(-1)[:numel].reshape(shape).to(dtype)


def encoded_nbytes(msg: tensor_pb2.Tensor) -> int:
    """Payload bytes of a message (what the wire-bytes metrics count)."""
    return len(msg.data) + len(msg.scales)
