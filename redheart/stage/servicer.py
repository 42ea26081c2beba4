"""The PipelineStage servicer of a stage process (CPU or GPU): log, delegate, answer a status.

The work is the :class:`StageRuntime`'s (redheart/stage/runtime.py); messages are decoded and
encoded by redheart/stage/wire.py; tensors to the peers go through the peer link
(redheart/stage/peer_link.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time

import grpc

from redheart import codec
from redheart.config import HybridConfig
from redheart.guard import clip
from redheart.metrics_common import StageMetrics
from redheart.rpc import RpcFailure, ServiceError, rpc_method
from redheart.stage.contracts import RoundPlan
from redheart.stage.errors import StageError
from redheart.stage.peer_link import GrpcPeerLink
from redheart.stage.runtime import StageRuntime
from redheart.stage.wire import WIRE_TO_KIND, decode_plan, encode_result, to_failure
from redheart.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)

VERSION = "0.1.0"
MAX_RUN_ID = 256
"""Longest run id a stage accepts (the orchestrator's are far shorter)."""


class StageServicer(stage_pb2_grpc.PipelineStageServicer):
    """One PipelineStage method each: check and decode the request (redheart/stage/wire.py), call
    the :class:`StageRuntime`, encode its answer or the status of its failure."""

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
            raise to_failure(exc) from None
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
        plan = decode_plan(request, self.config.wire, self.limits, self.max_chars)
        before = self.link.stats()
        with self._recv_lock:
            recv_before, decode_before = self._received_bytes, self._decode_seconds
        self._hold_lease(plan, context)
        try:
            result = self.runtime.run_round(plan, self.link)
        except StageError as exc:
            raise to_failure(exc) from None
        except ServiceError as exc:  # the regret service failed past its retries
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE, f"step {env.step}: {exc}", culprit=exc.service
            ) from None
        after = self.link.stats()
        with self._recv_lock:
            received = self._received_bytes - recv_before
            decode = self._decode_seconds - decode_before
        delta = {k: after[k] - before[k] for k in after}
        if self.metrics is not None and not plan.forward_only:
            self.metrics.observe_round(result)
            self.metrics.next_step.labels(self.metrics.stage).set(self.runtime.next_step)
        return encode_result(result, delta, received, decode)

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
            raise to_failure(exc) from None
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
        if env.kind not in WIRE_TO_KIND:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"step {env.step} micro-batch {env.micro_batch}: unknown tensor kind {env.kind}",
            )
        kind = WIRE_TO_KIND[env.kind]
        try:
            self.runtime.check_push(env.run_id, env.step, env.micro_batch, kind)
        except StageError as exc:
            raise to_failure(exc) from None
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
            raise to_failure(exc) from None
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
            raise to_failure(exc) from None
        return stage_pb2.LoadStateResponse(next_step=next_step)

    def GetParameters(self, request, context):
        # A generator: errors here are programming errors, reported by grpc as UNKNOWN.
        for name, tensor in self.runtime.named_parameters():
            yield tensor_pb2.NamedTensor(name=name, tensor=codec.encode(tensor.float().cpu(), name=name))
