"""The PipelineStage wire format of a stage: messages in and out, and the status of each failure.

What the servicer (redheart/stage/servicer.py) and the peer link (redheart/stage/peer_link.py)
share: tensor kinds to and from ``Envelope.kind``, :class:`StageError` kinds to gRPC status codes,
a ``StepPlan`` checked and decoded into a :class:`RoundPlan`, a :class:`RoundResult` encoded as a
``StepResult``.
"""

from __future__ import annotations

import math

import grpc

from redheart import codec
from redheart.config import WireConfig
from redheart.guard import clip
from redheart.rpc import RpcFailure
from redheart.stage.contracts import (
    ACTIVATION,
    EVAL_ACTIVATION,
    GRADIENT,
    MicroBatchInputs,
    RoundPlan,
    RoundResult,
)
from redheart.stage.errors import ErrorKind, StageError
from redheart.v1 import stage_pb2, tensor_pb2

KIND_TO_WIRE = {
    ACTIVATION: tensor_pb2.ACTIVATION,
    GRADIENT: tensor_pb2.GRADIENT,
    EVAL_ACTIVATION: tensor_pb2.EVAL_ACTIVATION,
}
WIRE_TO_KIND = {v: k for k, v in KIND_TO_WIRE.items()}
STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
"""The gRPC status of each :class:`ErrorKind`: one-to-one, so a client reads the kind from the code."""
KIND_OF_STATUS = {code: kind for kind, code in STATUS.items()}
assert len(KIND_OF_STATUS) == len(STATUS) == len(ErrorKind), "ErrorKind <-> gRPC status must be one-to-one"
# Every method of the PipelineStage contract (protos/redheart/v1/stage.proto), read from the
# compiled descriptor so a new RPC gets its metrics and tests without another list to keep in step.
STAGE_METHODS = tuple(m.name for m in stage_pb2.DESCRIPTOR.services_by_name["PipelineStage"].methods)


def to_failure(exc: StageError) -> RpcFailure:
    return RpcFailure(STATUS[exc.kind], str(exc), reason=exc.reason, culprit=exc.culprit)


def decode_plan(
    request: stage_pb2.StepPlan, wire: WireConfig, limits: codec.TensorLimits, max_chars: int
) -> RoundPlan:
    """A RunStep's plan, checked against the [wire] bounds (sizes from the declared shapes, before
    any tensor is decoded), then decoded; RpcFailure(INVALID_ARGUMENT) names what is wrong."""
    env = request.envelope
    if request.accumulation_steps < 1 or not 0 <= request.accumulation_round < request.accumulation_steps:
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: accumulation round {request.accumulation_round} of {request.accumulation_steps} is impossible",
        )
    if request.schedule not in ("1f1b", "gpipe"):
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: unknown schedule {request.schedule!r} (1f1b or gpipe)",
        )
    if request.lookahead < 0 or request.lookahead > len(request.micro_batches):
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: lookahead {request.lookahead} out of range",
        )
    if not (
        math.isfinite(request.deadline_seconds) and 0 < request.deadline_seconds <= wire.max_deadline_seconds
    ):
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: deadline_seconds = {request.deadline_seconds} must be in (0, "
            f"{wire.max_deadline_seconds:g}] (wire.max_deadline_seconds)",
        )
    samples, tokens = plan_size(request)
    if len(request.micro_batches) > wire.max_plan_samples or samples > wire.max_plan_samples:
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: {len(request.micro_batches)} micro-batches of {samples} samples in all exceed "
            f"wire.max_plan_samples = {wire.max_plan_samples}",
        )
    if tokens > wire.max_plan_tokens:
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: {tokens} token positions exceed wire.max_plan_tokens = {wire.max_plan_tokens}",
        )
    indices = [mb.index for mb in request.micro_batches]
    if len(set(indices)) != len(indices) or any(i < 0 for i in indices):
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"step {env.step}: micro-batch indices {clip(indices, max_chars)} must be distinct and >= 0",
        )
    micro_batches = [decode_inputs(mb, limits, max_chars) for mb in request.micro_batches]
    return RoundPlan(
        run_id=env.run_id,
        step=env.step,
        accumulation_round=request.accumulation_round,
        accumulation_steps=request.accumulation_steps,
        schedule=request.schedule,
        micro_batches=micro_batches,
        loss_multiplier=request.loss_multiplier,
        loss_scale=request.loss_scale,
        deadline_seconds=request.deadline_seconds,
        forward_only=request.forward_only,
        lookahead=request.lookahead,
        attempt=request.attempt,
    )


def decode_inputs(mb: stage_pb2.MicroBatch, limits: codec.TensorLimits, max_chars: int) -> MicroBatchInputs:
    tensors = {}
    for key, msg in mb.inputs.items():
        # The name is echoed in every error about this tensor: bounded, like the key it replaces.
        msg.name = clip(msg.name or f"micro-batch {mb.index} input {key}", max_chars)
        tensors[key] = codec.decode(msg, limits=limits)
    batch = tensors.get("attention_mask", tensors.get("input_ids"))
    if mb.sample_ids and batch is not None and batch.ndim >= 1 and batch.shape[0] != len(mb.sample_ids):
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"micro-batch {mb.index}: {len(mb.sample_ids)} sample_ids for a batch of {batch.shape[0]} "
            f"(send one id per sample, or none)",
        )
    return MicroBatchInputs(index=mb.index, tensors=tensors, sample_ids=list(mb.sample_ids))


def plan_size(request: stage_pb2.StepPlan) -> tuple[int, int]:
    """(samples, token positions) of a plan, from the declared shapes: checked before any decode."""
    samples = tokens = 0
    for mb in request.micro_batches:
        shapes = [list(msg.shape) for key, msg in mb.inputs.items() if key in ("attention_mask", "input_ids")]
        shape = shapes[0] if shapes else []
        rows = max(0, shape[0]) if shape else 0
        samples += rows
        tokens += rows * (max(0, shape[1]) if len(shape) > 1 else 1)
    return samples, tokens


def encode_result(
    result: RoundResult, link_stats: dict[str, float], received: int, decode_seconds: float
) -> stage_pb2.StepResult:
    out = stage_pb2.StepResult(
        envelope=tensor_pb2.Envelope(run_id=result.run_id, step=result.step),
        accumulation_round=result.accumulation_round,
        found_inf=result.found_inf,
        peak_memory_bytes=result.peak_memory_bytes,
    )
    if result.grad_norm_sq is not None:
        out.grad_norm_sq = result.grad_norm_sq
        out.has_grad_norm = True
    for mb in result.micro_batches:
        item = out.micro_batches.add(
            index=mb["index"],
            total_loss=mb.get("total_loss", 0.0),
            regret_mean=mb.get("regret_mean", 0.0),
            regret_max=mb.get("regret_max", 0.0),
            regret_computations=mb.get("regret_computations", 0),
            bentham_evaluations=mb.get("bentham_evaluations", 0),
            samples=mb.get("samples", 0),
        )
        for head, value in mb.get("losses", {}).items():
            item.losses[head] = value
        for name, tensor in mb.get("outputs", {}).items():
            item.outputs[name].CopyFrom(codec.encode(tensor, name=name))
    t = result.timings
    out.timings.CopyFrom(
        stage_pb2.StepTimings(
            forward_seconds=t.get("forward", 0.0),
            backward_seconds=t.get("backward", 0.0),
            wait_seconds=t.get("wait", 0.0),
            serialize_seconds=link_stats.get("serialize_seconds", 0.0) + decode_seconds,
            send_seconds=link_stats.get("send_seconds", 0.0),
            bytes_sent=int(link_stats.get("bytes_sent", 0)),
            bytes_received=received,
            total_seconds=t.get("total", 0.0),
            regret_wait_seconds=t.get("regret_wait", 0.0),
            allreduce_seconds=t.get("allreduce", 0.0),
            allreduce_bytes=int(t.get("allreduce_bytes", 0)),
        )
    )
    for action, mb_index, start, end in result.spans:
        out.spans.add(action=action, micro_batch=mb_index, start=start, end=end)
    for action, mb_index, start, end, thread in result.thread_spans:
        out.spans.add(action=action, micro_batch=mb_index, start=start, end=end, thread=thread)
    out.started_unix = result.started_unix
    return out
