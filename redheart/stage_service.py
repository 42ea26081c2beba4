"""gRPC side of a pipeline stage, shared by the CPU and GPU stage processes.

* :class:`StageServicer` – thin: decode (validated) -> call :class:`StageRuntime` -> encode.
* :class:`GrpcPeerLink` – pushes activations / gradients straight to the neighbouring stage on a
  sender thread, so serialization and transfer overlap the next micro-batch's compute.
* :func:`create_stage_server` – the factory behind ``cpu_stage.server.create_server`` and
  ``gpu_stage.server.create_server``: returns ``(StageServer, port)``; port 0 binds a free port.
* :func:`run_stage_cli` – the ``redheart-cpu-stage`` / ``redheart-gpu-stage`` process main.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from prometheus_client import CollectorRegistry

from redheart import codec
from redheart.config import ConfigError, HybridConfig, load_config
from redheart.guard import CallBudget, add_parsing_handlers, clip
from redheart.metrics_common import StageMetrics, start_metrics_endpoint
from redheart.process import exit_after_shutdown, watch_parent
from redheart.rpc import RpcFailure, ServiceError, bind, make_channel, make_server, rpc_method, set_serving
from redheart.stage_runtime import (
    ACTIVATION,
    EVAL_ACTIVATION,
    GRADIENT,
    MicroBatchInputs,
    RoundPlan,
    RoundResult,
    StageError,
    StageRuntime,
)
from redheart.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

if typing.TYPE_CHECKING:
    from redheart.cli_common import StageArgs

log = logging.getLogger(__name__)

_KIND_TO_WIRE = {
    ACTIVATION: tensor_pb2.ACTIVATION,
    GRADIENT: tensor_pb2.GRADIENT,
    EVAL_ACTIVATION: tensor_pb2.EVAL_ACTIVATION,
}
_WIRE_TO_KIND = {v: k for k, v in _KIND_TO_WIRE.items()}
_STATUS = {
    "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "aborted": grpc.StatusCode.ABORTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "internal": grpc.StatusCode.INTERNAL,
}
# Every method of the PipelineStage contract (protos/redheart/v1/stage.proto), read from the
# compiled descriptor so a new RPC gets its metrics and tests without another list to keep in step.
STAGE_METHODS = tuple(m.name for m in stage_pb2.DESCRIPTOR.services_by_name["PipelineStage"].methods)
VERSION = "0.1.0"
MAX_RUN_ID = 256
"""Longest run id a stage accepts (the orchestrator's are far shorter)."""
SERVER_THREADS = 16
RESERVED_THREADS = 4
"""Server threads kept free for health checks and AbortStep (guard.CallBudget)."""
_EXEMPT = ("/grpc.health.v1.Health/Check", "/redheart.v1.PipelineStage/AbortStep")


def _to_failure(exc: StageError) -> RpcFailure:
    return RpcFailure(_STATUS.get(exc.kind, grpc.StatusCode.INTERNAL), str(exc))


# ----------------------------------------------------------------------------- peer link


class GrpcPeerLink:
    """Ordered, asynchronous delivery of tensors to the neighbouring stages.

    Every push carries the attempt of its step (``Envelope.attempt``). :meth:`supersede` (an
    abort, a failed round) drops the step's queued pushes and stops the retries of the one in
    flight: no push outlives its attempt."""

    carries_attempts = True

    def __init__(
        self,
        stage_name: str,
        codec_name: str,
        max_message_mb: int,
        metrics: StageMetrics | None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata=None,
        security=None,
    ) -> None:
        self.stage_name = stage_name
        self.codec_name = codec_name
        self.max_message_mb = max_message_mb
        self.metrics = metrics
        self.security = security  # [security]: TLS / mTLS and the token on the pushes to the peer
        self.credentials = credentials
        self.metadata = metadata
        self.addresses: dict[str, str] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, stage_pb2_grpc.PipelineStageStub] = {}
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._pending = 0
        self._closing = False
        self._generation: dict[tuple[str, int], int] = {}  # (run, step) -> bumped by supersede()
        self._cond = threading.Condition()
        self._stats = {"serialize_seconds": 0.0, "send_seconds": 0.0, "bytes_sent": 0}
        self._spans: list[tuple[str, int, float, float]] = []  # sends (perf_counter) for the trace
        self._thread = threading.Thread(target=self._worker, name=f"{stage_name}-sender", daemon=True)
        self._thread.start()

    def connect(self, addresses: dict[str, str]) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()
        self._stubs.clear()
        self.addresses = {k: v for k, v in addresses.items() if v}
        for direction, address in self.addresses.items():
            channel = make_channel(address, self.max_message_mb, self.security, credentials=self.credentials)
            self._channels[direction] = channel
            self._stubs[direction] = stage_pb2_grpc.PipelineStageStub(channel)
        with self._cond:
            self._error = None

    def send(
        self,
        direction: str,
        run_id: str,
        step: int,
        micro_batch: int,
        kind: str,
        tensor: torch.Tensor,
        deadline: float | None = None,
        attempt: int = 0,
    ) -> None:
        if direction not in self._stubs:
            raise StageError(
                "precondition",
                f"the {self.stage_name} stage has no {direction} stage address (StartRun did not give one)",
            )
        with self._cond:
            if self._error is not None:
                raise StageError("unavailable", str(self._error))
            self._pending += 1
            generation = self._generation.get((run_id, step), 0)
        # Detached, and referenced by the queue until sent: the sender thread copies it to host memory
        # and serializes it while the compute thread goes on with the next micro-batch.
        self._queue.put(
            (
                direction,
                run_id,
                step,
                micro_batch,
                kind,
                tensor.detach(),
                deadline or time.monotonic() + 600.0,
                attempt,
                generation,
            )
        )

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            direction, run_id, step, micro_batch, kind, tensor, deadline, attempt, generation = item
            try:
                if self._superseded(run_id, step, generation):
                    continue  # its attempt was aborted while it waited in the queue
                t0 = time.perf_counter()
                name = f"{kind}[step {step}, micro-batch {micro_batch}]"
                msg = codec.encode(tensor, codec=self.codec_name, name=name)  # encode copies to host
                t1 = time.perf_counter()
                request = stage_pb2.TensorTransfer(
                    envelope=tensor_pb2.Envelope(
                        run_id=run_id,
                        step=step,
                        micro_batch=micro_batch,
                        kind=_KIND_TO_WIRE[kind],
                        attempt=attempt,
                    ),
                    tensor=msg,
                    sender=self.stage_name,
                )
                if not self._push(direction, request, deadline, (run_id, step, generation)):
                    continue
                t2 = time.perf_counter()
                nbytes = codec.encoded_nbytes(msg)
                with self._cond:
                    self._stats["serialize_seconds"] += t1 - t0
                    self._stats["send_seconds"] += t2 - t1
                    self._stats["bytes_sent"] += nbytes
                    if len(self._spans) >= 4096:  # bounded: evaluation rounds never collect theirs
                        del self._spans[:2048]
                    self._spans.append((f"send {kind}", micro_batch, t0, t2))
                if self.metrics is not None:
                    self.metrics.wire_bytes.labels(self.metrics.stage, "sent").inc(nbytes)
                    self.metrics.serialize_seconds.labels(self.metrics.stage, "encode").inc(t1 - t0)
            except BaseException as exc:  # keep the thread alive; report on flush / next send
                with self._cond:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _superseded(self, run_id: str, step: int, generation: int) -> bool:
        with self._cond:
            return self._closing or self._generation.get((run_id, step), 0) != generation

    def supersede(self, run_id: str, step: int) -> int:
        """The current attempt of (run, step) is over: drop its queued pushes, stop retrying the
        one in flight. Returns how many queued pushes were dropped."""
        with self._cond:
            key = (run_id, step)
            self._generation[key] = self._generation.get(key, 0) + 1
            while len(self._generation) > 64:
                del self._generation[next(iter(self._generation))]
        return self.purge(lambda item: item[1] == run_id and item[2] == step)

    def _push(self, direction: str, request, deadline: float, owner: tuple[str, int, int]) -> bool:
        """Deliver with retries; False when the push's attempt was superseded meanwhile."""
        address = self.addresses[direction]
        stub = self._stubs[direction]
        delay = 0.05
        while True:
            if self._superseded(*owner):
                return False
            remaining = deadline - time.monotonic()
            try:
                stub.PushTensor(request, timeout=max(0.05, min(remaining, 300.0)), metadata=self.metadata)
                return True
            except grpc.RpcError as exc:
                # Pushes are idempotent (the receiver drops duplicates), so retrying is safe. A
                # hand-written loop, not the channel's gRPC retry policy: the push waits out a peer
                # that is down for up to the plan's deadline (minutes), and gRPC's policy allows at
                # most 5 attempts inside one call's deadline. RESOURCE_EXHAUSTED: the peer holds its
                # bound of tensors for a step whose RunStep has not reached it yet; it frees them
                # once that RunStep starts.
                if (
                    exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                    and time.monotonic() + delay < deadline
                    and not self._closing
                ):
                    time.sleep(delay)
                    delay = min(2 * delay, 1.0)
                    continue
                peer = "gpu" if direction == "next" else "cpu"
                raise ServiceError(
                    f"{peer} stage", address, "PushTensor", exc.code(), exc.details() or ""
                ) from None

    def error(self) -> BaseException | None:
        with self._cond:
            return self._error

    def flush(self, timeout: float) -> None:
        """Wait until every queued tensor was delivered; fails when none was for ``timeout`` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            pending = self._pending
            while self._pending > 0:
                if self._pending < pending:  # progress: the deadline measures time since the last delivery
                    pending, deadline = self._pending, time.monotonic() + timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StageError(
                        "deadline",
                        f"{self._pending} tensor(s) still unsent, none delivered for {timeout:.0f}s",
                    )
                self._cond.wait(min(remaining, 1.0))
            if self._error is not None:
                err, self._error = self._error, None
                raise StageError("unavailable", f"sending to the peer stage failed: {err}")

    def take_spans(self, since: float) -> list[tuple[str, int, float, float, str]]:
        """The sends since the last call, relative to `since` (a perf_counter), on the sender thread."""
        with self._cond:
            spans, self._spans = self._spans, []
        return [
            (name, mb, start - since, end - since, "sender") for name, mb, start, end in spans if end >= since
        ]

    def reset_error(self) -> None:
        with self._cond:
            self._error = None

    def stats(self) -> dict[str, float]:
        with self._cond:
            return dict(self._stats)

    def purge(self, match: Callable[[tuple], bool] | None = None) -> int:
        """Drop the tensors queued but not yet taken by the sender thread (those ``match`` picks;
        default all); returns how many.

        An aborted attempt's pushes must not outlive it: left queued they would be retried on the
        next attempt's channel and could satisfy (or poison) its waits."""
        dropped = 0
        kept = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None or (match is not None and not match(item)):
                kept.append(item)  # None: close() is under way, keep its stop mark
                continue
            dropped += 1
        for item in kept:
            self._queue.put(item)
        if dropped:
            with self._cond:
                self._pending -= dropped
                self._cond.notify_all()
        return dropped

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender thread and the channels; waits for the thread (bounded).

        Queued tensors are dropped and the push in flight is cancelled by closing its channel, so
        the thread ends promptly instead of retrying a dead peer until the push deadline."""
        with self._cond:
            self._closing = True
        self.purge()
        self._queue.put(None)
        for ch in list(self._channels.values()):
            ch.close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s stage: the sender thread did not stop within %.0fs", self.stage_name, timeout)


# ----------------------------------------------------------------------------- servicer


def _decode_inputs(mb: stage_pb2.MicroBatch, limits: codec.TensorLimits, max_chars: int) -> MicroBatchInputs:
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


def _plan_size(request: stage_pb2.StepPlan) -> tuple[int, int]:
    """(samples, token positions) of a plan, from the declared shapes: checked before any decode."""
    samples = tokens = 0
    for mb in request.micro_batches:
        shapes = [list(msg.shape) for key, msg in mb.inputs.items() if key in ("attention_mask", "input_ids")]
        shape = shapes[0] if shapes else []
        rows = max(0, shape[0]) if shape else 0
        samples += rows
        tokens += rows * (max(0, shape[1]) if len(shape) > 1 else 1)
    return samples, tokens


def _encode_result(
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
        )
    )
    for action, mb_index, start, end in result.spans:
        out.spans.add(action=action, micro_batch=mb_index, start=start, end=end)
    for action, mb_index, start, end, thread in result.thread_spans:
        out.spans.add(action=action, micro_batch=mb_index, start=start, end=end, thread=thread)
    out.started_unix = result.started_unix
    return out


class StageServicer(stage_pb2_grpc.PipelineStageServicer):
    def __init__(
        self,
        runtime: StageRuntime,
        link: GrpcPeerLink,
        config: HybridConfig,
        metrics: StageMetrics | None,
        device: str,
        layer_range: str,
    ) -> None:
        self.runtime = runtime
        self.link = link
        self.config = config
        self.metrics = metrics
        self.device = device
        self.layer_range = layer_range
        self.limits = codec.TensorLimits(
            max_rank=config.wire.max_rank,
            max_bytes=config.wire.max_message_mb * 1024 * 1024,
            max_elements=config.wire.max_message_mb * 1024 * 1024,
        )
        self._recv_lock = threading.Lock()
        self._received_bytes = 0
        self._decode_seconds = 0.0
        self.max_chars = config.wire.max_error_chars
        self._callers: dict[tuple[str, int, int], int] = {}  # live RunStep calls per (run, step, round)
        runtime.max_early_pushes = config.wire.max_early_pushes
        if metrics is not None:
            runtime.mailbox.on_stale = metrics.stale_tensors.labels(metrics.stage).inc

    @rpc_method
    def Describe(self, request, context):
        rt = self.runtime
        return stage_pb2.DescribeResponse(
            stage_rank=rt.part.rank,
            num_stages=rt.part.num_stages,
            stage_name=rt.name,
            device=self.device,
            model_fingerprint=rt.fingerprint(),
            model_settings_json=json.dumps(rt.model_settings(), sort_keys=True),
            num_parameters=rt.num_parameters(),
            layer_range=self.layer_range,
            version=VERSION,
            current_run_id=rt.run_id,
            next_step=rt.next_step,
            wall_clock=time.time(),
            precision=rt.train_precision() if rt.run_id else "",
            **(rt.part.describe_device() if hasattr(rt.part, "describe_device") else {}),
        )

    @rpc_method
    def StartRun(self, request, context):
        if not request.run_id:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "StartRun needs a run_id")
        if len(request.run_id) > MAX_RUN_ID:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"run_id of {len(request.run_id)} characters is longer than {MAX_RUN_ID}",
            )
        try:
            settings = json.loads(request.train_settings_json or "{}")
        except json.JSONDecodeError as exc:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"train_settings_json is not JSON: {clip(exc, self.max_chars)}",
            ) from None
        except RecursionError:  # "[" * 100000: deeper than the parser goes
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT, "train_settings_json is nested too deeply"
            ) from None
        if not isinstance(settings, dict):
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "train_settings_json must be a JSON object")
        if request.first_step < 0:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"first_step {request.first_step} is negative")
        try:
            settings.setdefault("empty_cache_every", self.config.gpu_stage.empty_cache_every)
            n = self.runtime.start_run(
                request.run_id,
                settings,
                reinitialize=request.reinitialize,
                first_step=request.first_step,
                regret_address=request.regret_address,
            )
            # Only after the run was accepted: a refused StartRun must not repoint a running step's link.
            self.link.connect({"next": request.next_stage_address, "prev": request.prev_stage_address})
        except StageError as exc:
            raise _to_failure(exc) from None
        except (TypeError, ValueError) as exc:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT, f"StartRun settings: {clip(exc, self.max_chars)}"
            ) from None
        except RecursionError:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT, "StartRun settings are nested too deeply"
            ) from None
        if self.metrics is not None:
            self.metrics.parameters.labels(self.metrics.stage).set(n)
            self.metrics.next_step.labels(self.metrics.stage).set(self.runtime.next_step)
        return stage_pb2.StartRunResponse(
            num_parameters=n,
            precision=self.runtime.precision.name,
            precision_reason=self.runtime.precision.reason,
        )

    @rpc_method
    def RunStep(self, request, context):
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
        wire = self.config.wire
        if not (
            math.isfinite(request.deadline_seconds)
            and 0 < request.deadline_seconds <= wire.max_deadline_seconds
        ):
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"step {env.step}: deadline_seconds = {request.deadline_seconds} must be in (0, "
                f"{wire.max_deadline_seconds:g}] (wire.max_deadline_seconds)",
            )
        samples, tokens = _plan_size(request)
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
                f"step {env.step}: micro-batch indices {clip(indices, self.max_chars)} must be distinct and >= 0",
            )
        micro_batches = [_decode_inputs(mb, self.limits, self.max_chars) for mb in request.micro_batches]
        plan = RoundPlan(
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
        before = self.link.stats()
        with self._recv_lock:
            recv_before, decode_before = self._received_bytes, self._decode_seconds
        self._hold_lease(plan, context)
        try:
            result = self.runtime.run_round(plan, self.link)
        except StageError as exc:
            raise _to_failure(exc) from None
        except ServiceError as exc:  # the regret service failed past its retries
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"step {env.step}: {exc}") from None
        after = self.link.stats()
        with self._recv_lock:
            received = self._received_bytes - recv_before
            decode = self._decode_seconds - decode_before
        delta = {k: after[k] - before[k] for k in after}
        if self.metrics is not None and not plan.forward_only:
            self.metrics.observe_round(result)
            self.metrics.next_step.labels(self.metrics.stage).set(self.runtime.next_step)
        return _encode_result(result, delta, received, decode)

    def _hold_lease(self, plan: RoundPlan, context) -> None:
        """The orchestrator's RunStep call is its lease on the round: when the call ends (the
        orchestrator died, its connection broke, it gave up) and no retry of the same round
        arrives within orchestrator.lease_seconds, the round is aborted, so the stage does not
        hold its lock for the step deadline and a new orchestrator's StartRun is accepted."""
        key = (plan.run_id, plan.step, plan.accumulation_round)
        with self._recv_lock:
            self._callers[key] = self._callers.get(key, 0) + 1

        def expire() -> None:
            rt = self.runtime
            with self._recv_lock:
                gone = self._callers.get(key, 0) == 0
            if (
                gone
                and rt.running.is_set()
                and rt.current_plan is not None
                and rt.current_plan.run_id == key[0]
                and rt.current_plan.step == key[1]
                and rt.current_plan.accumulation_round == key[2]
            ):
                log.warning(
                    "%s stage: the orchestrator's call for step %d ended %.0fs ago: aborting the round",
                    rt.name,
                    key[1],
                    lease,
                )
                rt.abort(
                    key[0], key[1], "the orchestrator stopped waiting for this round (its lease expired)"
                )

        def ended() -> None:
            with self._recv_lock:
                self._callers[key] -= 1
                if self._callers[key] == 0:
                    del self._callers[key]
            if self.runtime.running.is_set():
                timer = threading.Timer(lease, expire)
                timer.name, timer.daemon = "lease-timer", True
                timer.start()

        lease = self.config.orchestrator.lease_seconds
        if not context.add_callback(ended):
            ended()  # the call already ended

    @rpc_method
    def ApplyStep(self, request, context):
        env = request.envelope
        try:
            out = self.runtime.apply(
                env.run_id,
                env.step,
                request.clip_coefficient,
                request.learning_rate,
                request.skip,
                loss_scale=request.loss_scale if request.loss_scale > 0 else 1.0,
            )
        except StageError as exc:
            raise _to_failure(exc) from None
        if self.metrics is not None:
            self.metrics.steps_applied.labels(self.metrics.stage).inc()
            self.metrics.next_step.labels(self.metrics.stage).set(out["next_step"])
        return stage_pb2.ApplyResponse(
            next_step=out["next_step"],
            seconds=out["seconds"],
            applied=out["applied"],
            started_unix=out.get("started_unix", 0.0),
        )

    @rpc_method
    def AbortStep(self, request, context):
        self.runtime.abort(
            request.run_id,
            request.step,
            clip(request.reason or "aborted by the orchestrator", self.max_chars),
            request.attempt,
        )
        if request.run_id == self.runtime.run_id:
            self.link.supersede(request.run_id, request.step)  # what this stage still had to send for it
        return stage_pb2.AbortResponse()

    @rpc_method
    def PushTensor(self, request, context):
        env = request.envelope
        if env.kind not in _WIRE_TO_KIND:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"step {env.step} micro-batch {env.micro_batch}: unknown tensor kind {env.kind}",
            )
        kind = _WIRE_TO_KIND[env.kind]
        try:
            self.runtime.check_push(env.run_id, env.step, env.micro_batch, kind)
        except StageError as exc:
            raise _to_failure(exc) from None
        msg = request.tensor
        msg.name = clip(msg.name or f"{kind}[step {env.step}, micro-batch {env.micro_batch}]", self.max_chars)
        t0 = time.perf_counter()
        tensor = codec.decode(msg, limits=self.limits)
        elapsed = time.perf_counter() - t0
        try:
            self.runtime.part.check_tensor(kind, tensor)
        except StageError as exc:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT, f"step {env.step} micro-batch {env.micro_batch}: {exc}"
            ) from None
        nbytes = codec.encoded_nbytes(msg)
        with self._recv_lock:
            self._received_bytes += nbytes
            self._decode_seconds += elapsed
        if self.metrics is not None:
            self.metrics.wire_bytes.labels(self.metrics.stage, "received").inc(nbytes)
            self.metrics.serialize_seconds.labels(self.metrics.stage, "decode").inc(elapsed)
        outcome = self.runtime.mailbox.put((env.run_id, env.step, env.micro_batch, kind), tensor, env.attempt)
        return stage_pb2.PushAck(duplicate=outcome == "duplicate", stale=outcome == "stale")

    @rpc_method
    def SaveState(self, request, context):
        if not request.directory:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "SaveState needs a directory")
        try:
            out = self.runtime.save(request.run_id, request.step, request.directory)
        except StageError as exc:
            raise _to_failure(exc) from None
        if self.metrics is not None:
            self.metrics.checkpoint_seconds.labels(self.metrics.stage).observe(out["seconds"])
        return stage_pb2.SaveStateResponse(
            files=out["files"], bytes=out["bytes"], seconds=out["seconds"], sha256=out["sha256"]
        )

    @rpc_method
    def LoadState(self, request, context):
        if not request.directory:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, "LoadState needs a directory")
        try:
            next_step = self.runtime.load(
                request.run_id,
                request.step,
                request.directory,
                self.config.checkpoint.max_load_mb * 1024 * 1024,
            )
        except StageError as exc:
            raise _to_failure(exc) from None
        return stage_pb2.LoadStateResponse(next_step=next_step)

    def GetParameters(self, request, context):
        # A generator: errors here are programming errors, reported by grpc as UNKNOWN.
        for name, tensor in self.runtime.named_parameters():
            yield tensor_pb2.NamedTensor(name=name, tensor=codec.encode(tensor.float().cpu(), name=name))


# ----------------------------------------------------------------------------- server


@dataclass
class StageServer:
    """A running stage service: grpc server + health + peer link. stop() drains then stops."""

    server: grpc.Server
    health: Any
    servicer: StageServicer
    link: GrpcPeerLink
    port: int
    name: str

    def stop(self, grace: float = 10.0) -> None:
        set_serving(self.health, False)
        runtime = self.servicer.runtime
        plan = runtime.current_plan
        if runtime.running.is_set() and runtime.run_id and plan is not None:
            # A RunStep waiting on its peer would otherwise hold its thread until the step deadline
            # (minutes), keeping the process alive long after the grace period.
            runtime.abort(runtime.run_id, plan.step, "the stage is shutting down")
        self.server.stop(grace).wait()
        # Every thread this stage started is stopped and joined here (the sender, the regret
        # client's pool): none may be left inside torch or grpc when the process ends.
        self.link.close()
        regret = getattr(self.servicer.runtime.part, "regret", None)
        if regret is not None:
            regret.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def create_stage_server(
    config: HybridConfig,
    *,
    stage: str,
    part_factory: Callable[[], Any],
    host: str,
    port: int,
    registry: CollectorRegistry | None = None,
    device: str = "cpu",
    layer_range: str = "",
    metrics_factory: Callable[[CollectorRegistry], StageMetrics] | None = None,
) -> tuple[StageServer, int]:
    from redheart.model import resolve_model_shape

    shape = resolve_model_shape(config.model)
    metrics = None
    if registry is not None:
        metrics = (
            metrics_factory(registry)
            if metrics_factory
            else StageMetrics(registry, stage=stage, methods=STAGE_METHODS)
        )
    runtime = StageRuntime(part_factory, shape)
    link = GrpcPeerLink(
        stage, config.wire.codec, config.wire.max_message_mb, metrics, security=config.security
    )
    servicer = StageServicer(runtime, link, config, metrics, device=device, layer_range=layer_range)
    interceptors = [metrics.grpc] if metrics is not None else []
    interceptors.append(CallBudget(SERVER_THREADS - RESERVED_THREADS, _EXEMPT))
    server, health = make_server(
        max_message_mb=config.wire.max_message_mb,
        max_workers=SERVER_THREADS,
        max_concurrent_rpcs=config.wire.max_concurrent_rpcs,
        interceptors=interceptors,
        security=config.security,
    )
    add_parsing_handlers(server, servicer, stage_pb2.DESCRIPTOR.services_by_name["PipelineStage"])
    bound = bind(server, host, port, security=config.security)
    server.start()
    if metrics is not None:
        metrics.parameters.labels(stage).set(runtime.num_parameters())
    set_serving(health, True, ["redheart.v1.PipelineStage"])
    return StageServer(server, health, servicer, link, bound, stage), bound


# ----------------------------------------------------------------------------- process main


def run_stage_cli(stage: str, create_server: Callable[..., tuple[StageServer, int]], args: StageArgs) -> int:
    """The stage process main; ``args`` comes parsed from the click command in redheart/cli_common.py."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {stage}-stage %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = load_config(args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    section = getattr(config, f"{stage}_stage")
    host = args.host or section.host
    port = section.port if args.port is None else args.port
    metrics_port = section.metrics_port if args.metrics_port is None else args.metrics_port
    if section.threads:
        torch.set_num_threads(section.threads)
    try:
        # The stage runs one action at a time: an inter-op pool would only add threads competing
        # for the cores its intra-op threads use.
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed in this process (a test that runs several stages in one)
        pass
    log.info(
        "%s stage: torch threads intra-op %d, inter-op %d",
        stage,
        torch.get_num_threads(),
        torch.get_num_interop_threads(),
    )
    registry = CollectorRegistry()
    try:
        server, bound = create_server(config, host=host, port=port, registry=registry)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {stage} stage cannot start: {exc}", file=sys.stderr)
        return 1
    bound_metrics = 0
    if config.metrics.enabled and (metrics_port or args.metrics_port == 0):
        try:
            _http, bound_metrics = start_metrics_endpoint(registry, config.metrics.host, metrics_port)
        except OSError as exc:
            print(
                f"error: cannot serve metrics on {config.metrics.host}:{metrics_port}: {exc}", file=sys.stderr
            )
            server.stop(0)
            return 1
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)  # no logging here: the handler may interrupt the main thread mid-write
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    watcher = watch_parent(stop)
    d = server.servicer
    log.info(
        "%s stage listening on %s:%d (%s, %s, %d parameters, %s), metrics on %s",
        stage,
        host,
        bound,
        d.device,
        d.layer_range,
        d.runtime.num_parameters(),
        config.security.describe(),
        bound_metrics or "off",
    )
    print(f"REDHEART_READY service={stage}_stage port={bound} metrics_port={bound_metrics}", flush=True)
    while not stop.wait(0.5):
        pass
    if received:
        log.info(
            "received %s: draining (health NOT_SERVING, in-flight calls finish)",
            signal.Signals(received[0]).name,
        )
    server.stop(grace=10.0)
    if watcher is not None:
        watcher.join(timeout=2.0)
    log.info("%s stage stopped", stage)
    exit_after_shutdown(0, f"{stage} stage")
