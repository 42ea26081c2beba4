"""The peer link of a stage: pushes activations / gradients straight to the neighbouring stage.

:class:`GrpcPeerLink` implements the ``PeerLink`` of redheart/stage/contracts.py over gRPC. Its
sender thread serializes and sends, so the transfer overlaps the next micro-batch's compute.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import grpc
import torch

from redheart import codec
from redheart.metrics_common import StageMetrics
from redheart.rpc import ServiceError, make_channel
from redheart.stage.errors import StageError
from redheart.stage.wire import KIND_TO_WIRE
from redheart.v1 import stage_pb2, stage_pb2_grpc, tensor_pb2

log = logging.getLogger(__name__)


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
        security=None,
    ) -> None:
        self.stage_name = stage_name
        self.codec_name = codec_name
        self.max_message_mb = max_message_mb
        self.metrics = metrics
        self.security = security  # [security]: TLS / mTLS and the token on the pushes to the peer
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
            channel = make_channel(address, self.max_message_mb, self.security)
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
                        kind=KIND_TO_WIRE[kind],
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
                stub.PushTensor(request, timeout=max(0.05, min(remaining, 300.0)))
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
