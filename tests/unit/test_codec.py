import pytest
import torch

from redheart import codec
from redheart.codec import TensorLimits, TensorValidationError, decode, encode
from redheart.v1 import tensor_pb2

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.float64,
    torch.int8,
]


def _sample(dtype, shape=(3, 5, 7)):
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(
        dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_exact_for_every_dtype(dtype):
    t = _sample(dtype)
    msg = encode(t, name="x")
    assert msg.shape == [3, 5, 7]
    out = decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert out.dtype == dtype
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_size_tensors_round_trip(dtype):
    t = torch.empty((0, 4), dtype=dtype)
    out = decode(encode(t))
    assert out.shape == (0, 4) and out.dtype == dtype


def test_scalar_and_non_contiguous():
    s = torch.tensor(3.5)
    assert decode(encode(s)).item() == 3.5
    t = torch.arange(12.0).view(3, 4).t()  # non-contiguous
    assert torch.equal(decode(encode(t)), t)


def test_tensor_larger_than_4_mib_round_trips():
    t = torch.randn(3, 1024, 1024)  # 12 MiB
    msg = encode(t)
    assert len(msg.SerializeToString()) > 4 * 1024 * 1024
    assert torch.equal(decode(msg), t)


@pytest.mark.parametrize("name,bound", [("fp16", 1e-3), ("bf16", 8e-3), ("int8", 1.0 / 127)])
def test_lossy_codecs_halve_or_quarter_the_bytes_with_bounded_error(name, bound):
    t = torch.randn(64, 300)
    msg = encode(t, codec=name)
    out = decode(msg)
    assert out.dtype == torch.float32 and out.shape == t.shape
    rel = float(((out - t).abs() / t.abs().max()).max())
    assert rel <= bound
    raw = t.numel() * 4
    assert codec.encoded_nbytes(msg) <= raw / (2 if name != "int8" else 3.5)


def test_integer_tensors_are_never_lossy():
    ids = torch.arange(100)
    assert torch.equal(decode(encode(ids, codec="int8")), ids)


def _msg(**kw):
    base = dict(dtype=tensor_pb2.FLOAT32, shape=[2, 2], data=b"\0" * 16, name="act")
    base.update(kw)
    return tensor_pb2.Tensor(**base)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(data=b"\0" * 15), "byte length 15 does not match shape [2, 2] x float32 (16 bytes)"),
        (dict(dtype=99), "unknown dtype code 99"),
        (dict(dtype=tensor_pb2.DTYPE_UNSPECIFIED), "unknown dtype code 0"),
        (dict(shape=[1] * 40, data=b"\0" * 4), "rank 40 exceeds the limit"),
        (dict(shape=[2, -3]), "dimension 1 is negative"),
        (dict(shape=[1 << 40, 1 << 40]), "above the limit"),
        (dict(shape=[1 << 30, 1 << 30, 1 << 30], data=b""), "holds more than"),
        (dict(codec=7), "unknown codec code 7"),
        (
            dict(dtype=tensor_pb2.INT64, shape=[2], data=b"\0" * 16, codec=tensor_pb2.CODEC_FP16),
            "needs a float dtype",
        ),
        (dict(codec=tensor_pb2.CODEC_INT8_BLOCKWISE, data=b"\0" * 4, block_size=0), "block_size 0"),
        (
            dict(codec=tensor_pb2.CODEC_INT8_BLOCKWISE, data=b"\0" * 4, block_size=2, scales=b"\0" * 4),
            "scales hold 4 bytes, expected 8",
        ),
        (
            dict(dtype=tensor_pb2.BOOL, shape=[2], data=b"\x00\x07"),
            "bool tensor holds bytes other than 0 and 1",
        ),
    ],
)
def test_malformed_messages_are_rejected_with_a_message_naming_the_problem(kwargs, needle):
    with pytest.raises(TensorValidationError) as err:
        decode(_msg(**kwargs))
    assert needle in str(err.value)
    assert "tensor 'act'" in str(err.value)


def test_limits_allow_list_and_expectations():
    limits = TensorLimits(allowed_dtypes=frozenset({"float32"}))
    with pytest.raises(TensorValidationError, match="dtype int64 is not allowed"):
        decode(encode(torch.arange(3)), limits=limits)
    with pytest.raises(TensorValidationError, match="expected float32"):
        decode(encode(torch.arange(3)), expect_dtype=torch.float32)
    with pytest.raises(TensorValidationError, match="expected 3"):
        decode(encode(torch.zeros(2, 2)), expect_rank=3)
    with pytest.raises(TensorValidationError, match="16 bytes exceeds the limit of 8"):
        decode(encode(torch.zeros(4)), limits=TensorLimits(max_bytes=8))


def test_int8_scales_must_be_finite():
    msg = encode(torch.randn(10), codec="int8", block_size=4)
    msg.scales = b"\x00\x00\xc0\x7f" * 3  # NaN scales
    with pytest.raises(TensorValidationError, match="inf or NaN"):
        decode(msg)


def test_encode_refuses_unknown_codec():
    with pytest.raises(ValueError, match="unknown codec"):
        encode(torch.zeros(2), codec="zip")
