"""Client of one pipeline stage service. All its grpc errors surface as redheart.rpc.ServiceError."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from orchestrator.stages import stage_links
from redheart import codec, fault_injection
from redheart.rpc import RetryPolicy, ServiceError, call, make_channel
from redheart.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2


@dataclass
class StageInfo:
    rank: int
    name: str
    device: str
    fingerprint: str
    settings: dict[str, Any]
    num_parameters: int
    layer_range: str
    next_step: int
    run_id: str
    precision: str = ""  # of the current run ("" before StartRun)
    device_name: str = ""
    compute_capability: str = ""
    total_memory_bytes: int = 0
    free_memory_bytes: int = 0
    memory_budget_bytes: int = 0


class StageClient:
    def __init__(
        self,
        name: str,
        address: str,
        *,
        max_message_mb: int,
        rpc_timeout: float,
        security=None,
        retry: RetryPolicy | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name  # "cpu stage" / "gpu stage"
        self.alive = alive  # local launch: whether the service's process is running
        self.address = address
        self.rpc_timeout = rpc_timeout
        # security ([security]): TLS / mTLS and the bearer token, applied by make_channel.
        # retry ([wire] retry_*): gRPC retries the idempotent calls itself (redheart.rpc.RetryPolicy).
        self.retry = retry
        self._channel_args = (max_message_mb, security)
        self.channel = make_channel(address, max_message_mb, security, retry=retry)
        self.stub = stage_pb2_grpc.PipelineStageStub(self.channel)
        self.trace = None  # an orchestrator.trace.TraceRecorder while --trace is on
        self.precision = ""  # what the stage said it trains in, at the last StartRun
        self.precision_reason = ""

    def reconnect(self) -> None:
        """A fresh channel: one whose server died waits out a reconnect backoff that grows with
        every failure, long after a restarted server is back."""
        max_message_mb, security = self._channel_args
        old = self.channel
        self.channel = make_channel(self.address, max_message_mb, security, retry=self.retry)
        self.stub = stage_pb2_grpc.PipelineStageStub(self.channel)
        old.close()

    def _call(
        self, method: str, request, *, timeout: float | None = None, idempotent: bool = True, retry_until=None
    ):
        timeout = timeout or self.rpc_timeout
        once = functools.partial(
            call,
            getattr(self.stub, method),
            request,
            service=self.name,
            address=self.address,
            timeout=timeout,
            method_name=method,
        )
        if self.alive is None:
            return once(
                idempotent=idempotent,
                retry_until=retry_until,
                channel_retries=self.retry is not None and self.retry.max_attempts > 1,
            )
        # A process we watch: retry a refused connection only while the process lives. Retrying a
        # dead one until the deadline (or waiting for it to be ready, as calls on a channel with a
        # retry policy do) would only delay the recovery that restarts it.
        give_up = retry_until if retry_until is not None else time.monotonic() + timeout
        delay = 0.05
        while True:
            try:
                return once(idempotent=False)
            except ServiceError as exc:
                unavailable = exc.code == grpc.StatusCode.UNAVAILABLE
                if not (idempotent and unavailable and self.alive() and time.monotonic() + delay < give_up):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def describe(self) -> StageInfo:
        r = self._call("Describe", stage_pb2.DescribeRequest())
        return StageInfo(
            r.stage_rank,
            r.stage_name,
            r.device,
            r.model_fingerprint,
            json.loads(r.model_settings_json or "{}"),
            r.num_parameters,
            r.layer_range,
            r.next_step,
            r.current_run_id,
            r.precision,
            r.device_name,
            r.compute_capability,
            r.device_total_memory_bytes,
            r.device_free_memory_bytes,
            r.memory_budget_bytes,
        )

    def start_run(
        self,
        run_id: str,
        settings: Mapping[str, Any],
        *,
        next_address: str,
        prev_address: str,
        regret_address: str,
        first_step: int,
        reinitialize: bool,
    ) -> int:
        r = self._call(
            "StartRun",
            stage_pb2.StartRunRequest(
                run_id=run_id,
                train_settings_json=json.dumps(settings),
                next_stage_address=next_address,
                prev_stage_address=prev_address,
                regret_address=regret_address,
                first_step=first_step,
                reinitialize=reinitialize,
            ),
        )
        self.precision, self.precision_reason = r.precision, r.precision_reason
        return r.num_parameters

    def run_step(self, request: stage_pb2.StepPlan, timeout: float) -> stage_pb2.StepResult:
        # Idempotent on the stage side (results are cached per (run, step, round)), so a retry after
        # a dropped connection returns the same result instead of running the round twice. The
        # retry window is short: a stage that stays unreachable is a failure to recover from.
        fault_injection.point(
            f"RunStep {self.name}", request.envelope.step
        )  # test-only; no-op without a plan
        t_call = time.time()
        result = self._call(
            "RunStep",
            request,
            timeout=timeout,
            idempotent=True,
            retry_until=time.monotonic() + min(timeout, 10.0),
        )
        if self.trace is not None:
            self.trace.stage_round(self.name, request, result, t_call, time.time())
        return result

    def apply(
        self, run_id: str, step: int, clip: float, lr: float, skip: bool, loss_scale: float
    ) -> stage_pb2.ApplyResponse:
        t_call = time.time()
        response = self._call(
            "ApplyStep",
            stage_pb2.ApplyRequest(
                envelope=tensor_pb2.Envelope(run_id=run_id, step=step),
                clip_coefficient=clip,
                learning_rate=lr,
                skip=skip,
                loss_scale=loss_scale,
            ),
        )
        if self.trace is not None:
            self.trace.stage_apply(self.name, step, response, t_call, time.time())
        return response

    def clock_sample(self) -> tuple[float, float, float]:
        """(sent, the stage's wall clock, received) of one Describe: a sample of the clock offset."""
        t_send = time.time()
        remote = self._call("Describe", stage_pb2.DescribeRequest()).wall_clock
        return t_send, remote, time.time()

    def abort(self, run_id: str, step: int, reason: str, attempt: int = 0) -> None:
        self._call(
            "AbortStep",
            stage_pb2.AbortRequest(run_id=run_id, step=step, reason=reason, attempt=attempt),
            timeout=10.0,
        )

    def save(self, run_id: str, step: int, directory: str) -> stage_pb2.SaveStateResponse:
        return self._call(
            "SaveState", stage_pb2.SaveStateRequest(run_id=run_id, step=step, directory=directory)
        )

    def load(self, run_id: str, step: int, directory: str) -> int:
        return self._call(
            "LoadState", stage_pb2.LoadStateRequest(run_id=run_id, step=step, directory=directory)
        ).next_step

    def parameters(self) -> dict[str, torch.Tensor]:
        out = {}
        try:
            for item in self.stub.GetParameters(
                stage_pb2.GetParametersRequest(), timeout=self.rpc_timeout * 10
            ):
                out[item.name] = codec.decode(item.tensor)
        except grpc.RpcError as exc:
            raise ServiceError(
                self.name, self.address, "GetParameters", exc.code(), exc.details() or ""
            ) from None
        return out

    def close(self) -> None:
        self.channel.close()


def micro_batch_message(
    index: int, tensors: Mapping[str, torch.Tensor], keys: Sequence[str], sample_ids: Sequence[str] = ()
) -> stage_pb2.MicroBatch:
    mb = stage_pb2.MicroBatch(index=index, sample_ids=list(sample_ids))
    for key in keys:
        mb.inputs[key].CopyFrom(codec.encode(tensors[key], name=f"micro-batch {index} {key}"))
    return mb


def start_stages(
    clients: Sequence[StageClient],
    run_id: str,
    settings: Mapping[str, Any],
    *,
    regret_address: str,
    first_step: int = 0,
    reinitialize: bool = True,
) -> None:
    """StartRun on every stage of a pipeline (clients in pipeline order), each told its peers."""
    for client, link in zip(clients, stage_links([c.address for c in clients], regret_address)):
        client.start_run(run_id, settings, first_step=first_step, reinitialize=reinitialize, **link)
