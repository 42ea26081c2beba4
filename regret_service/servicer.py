"""The thin RegretService servicer: decode and validate -> the worker pool -> encode.

Errors (see docs/regret.md):

* INVALID_ARGUMENT – a malformed tensor (codec), a wrong dtype / rank / shape, NaN or Inf, a value
  out of range, a batch above ``regret.max_batch``, scenario_ids of the wrong length. The message
  names the problem; the server keeps serving.
* INTERNAL – a worker died twice on the same chunk (the request is not scored).
* DEADLINE_EXCEEDED – the call's deadline passed inside the pool.
* UNAVAILABLE – the service is shutting down.

Score is a pure function of its request, so retries are safe; the last responses are also kept by
envelope (run_id, step, micro_batch) so a client's retry of a request that did finish costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator

import grpc
import numpy as np
import torch

from redheart import calculus
from redheart.codec import DEFAULT_LIMITS, TensorLimits, TensorValidationError, decode, encode
from redheart.guard import clip
from redheart.rpc import RpcFailure, rpc_method
from redheart.v1 import regret_pb2, regret_pb2_grpc
from regret_service.logic import PoolClosed, PoolTimeout, WorkerCrashed, WorkerPool
from regret_service.metrics import RegretMetrics

log = logging.getLogger(__name__)

__all__ = ["RegretServicer", "CACHE_SIZE"]

CACHE_SIZE = 32
"""Responses kept for idempotent retries (a few steps' worth of micro-batches)."""
CACHE_BYTES = 64 << 20
"""...and at most this many bytes of requests and responses (regret.cache_mb)."""


class RegretServicer(regret_pb2_grpc.RegretServiceServicer):
    def __init__(
        self,
        pool: WorkerPool,
        metrics: RegretMetrics,
        *,
        max_batch: int,
        limits: TensorLimits = DEFAULT_LIMITS,
        cache_size: int = CACHE_SIZE,
        cache_bytes: int = CACHE_BYTES,
        max_error_chars: int = 200,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.max_batch = max_batch
        self.limits = limits
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.max_error_chars = max_error_chars
        # key -> (request, response, their size in bytes); bounded in entries and in bytes.
        self._cache: OrderedDict[
            tuple[str, int, int], tuple[regret_pb2.ScoreRequest, regret_pb2.ScoreResponse, int]
        ] = OrderedDict()
        self._cached_bytes = 0
        self._active = 0
        self._lock = threading.Lock()

    @rpc_method
    def Score(
        self, request: regret_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> regret_pb2.ScoreResponse:
        with self.metrics.in_flight.track_inprogress(), self._counted():
            return self._score(request, context)

    @property
    def calls_in_flight(self) -> int:
        """Score calls inside the handler now (a stopping server reports those it cancels)."""
        with self._lock:
            return self._active

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def _score(
        self, request: regret_pb2.ScoreRequest, context: grpc.ServicerContext
    ) -> regret_pb2.ScoreResponse:
        try:
            rows, ids = self._validated(request)
        except RpcFailure:
            self.metrics.requests.labels("invalid").inc()
            raise

        key = self._cache_key(request)
        if key is not None:
            with self._lock:
                hit = self._cache.get(key)
                # Compared only on a hit (no hashing of every request): the same envelope with other
                # content is a new question, never answered from the cache.
                if hit is not None and hit[0] == request:
                    self._cache.move_to_end(key)
                    self.metrics.requests.labels("cached").inc()
                    return hit[1]
            if hit is not None:
                log.warning(
                    "Score %s: same envelope as an earlier request but different content; scoring again", key
                )

        remaining = context.time_remaining()
        try:
            result = self.pool.score(rows, explain=request.explain, timeout=remaining, validate=False)
        except ValueError as exc:  # the pool's own validation (should have been caught above)
            self.metrics.requests.labels("invalid").inc()
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"bentham: {exc}") from None
        except PoolTimeout as exc:
            self.metrics.requests.labels("failed").inc()
            raise RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)) from None
        except PoolClosed as exc:
            self.metrics.requests.labels("failed").inc()
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except WorkerCrashed as exc:
            self.metrics.requests.labels("failed").inc()
            raise RpcFailure(grpc.StatusCode.INTERNAL, str(exc)) from None
        except Exception:  # unexpected: rpc_method logs it and answers INTERNAL
            self.metrics.requests.labels("failed").inc()
            raise

        batch = rows.shape[0]
        self.metrics.observe_batch(
            batch,
            result.regret_computations,
            result.bentham_evaluations,
            float(result.regret.mean(dtype=np.float64)) if batch else None,
            result.seconds,
        )
        response = regret_pb2.ScoreResponse(
            regret_computations=result.regret_computations,
            bentham_evaluations=result.bentham_evaluations,
            seconds=result.seconds,
        )
        # CopyFrom: much cheaper than passing large sub-messages as constructor keywords.
        response.regret.CopyFrom(encode(torch.from_numpy(result.regret), name="regret"))
        response.best_counterfactual.CopyFrom(
            encode(torch.from_numpy(result.best_index), name="best_counterfactual")
        )
        if request.explain and result.detail is not None:
            response.explanations.extend(_explanations(result.detail, ids))
        size = request.ByteSize() + response.ByteSize() if key is not None else 0
        if key is not None and size <= self.cache_bytes:
            with self._lock:
                old = self._cache.pop(key, None)
                if old is not None:
                    self._cached_bytes -= old[2]
                self._cache[key] = (request, response, size)
                self._cached_bytes += size
                while len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
                    _key, (_req, _resp, dropped) = self._cache.popitem(last=False)
                    self._cached_bytes -= dropped
        return response

    def cache_usage(self) -> tuple[int, int]:
        """(entries, bytes) held for retried calls."""
        with self._lock:
            return len(self._cache), self._cached_bytes

    def _validated(self, request: regret_pb2.ScoreRequest) -> tuple[np.ndarray, list[str]]:
        if not request.HasField("bentham"):
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT, "ScoreRequest.bentham is missing (float32 [B, 8])"
            )
        msg = request.bentham
        msg.name = clip(msg.name or "bentham", self.max_error_chars)  # echoed in every error about it
        label = msg.name
        # Cheap shape checks before decode touches the bytes: a huge batch is refused unread.
        if len(msg.shape) == 2 and msg.shape[0] > self.max_batch:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor '{label}': batch of {msg.shape[0]} scenarios exceeds regret.max_batch = {self.max_batch} "
                f"(fix: send smaller batches or raise regret.max_batch)",
            )
        try:
            tensor = decode(msg, limits=self.limits, expect_dtype=torch.float32, expect_rank=2)
        except TensorValidationError as exc:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        rows = tensor.numpy()
        try:
            calculus.validate_bentham(rows)
        except ValueError as exc:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"tensor '{label}': {exc}") from None
        ids = list(request.scenario_ids)
        if ids and len(ids) != rows.shape[0]:
            raise RpcFailure(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"scenario_ids holds {len(ids)} ids for a batch of {rows.shape[0]} scenarios (send one per row or none)",
            )
        return rows, ids

    @staticmethod
    def _cache_key(request: regret_pb2.ScoreRequest) -> tuple[str, int, int] | None:
        env = request.envelope
        if not request.HasField("envelope") or not env.run_id:
            return None  # ad-hoc calls without an envelope are not cached
        return env.run_id, int(env.step), int(env.micro_batch)


def _explanations(detail: calculus.RegretResult, ids: list[str]) -> list[regret_pb2.Explanation]:
    out = []
    for i in range(detail.regret.shape[0]):
        out.append(
            regret_pb2.Explanation(
                scenario_id=ids[i] if ids else str(i),
                regret=float(detail.regret[i]),
                best_counterfactual=int(detail.best_index[i]),
                best_counterfactual_name=detail.best_name[i],
                actual_utility=float(detail.actual_utility[i]),
                counterfactual_utilities=detail.counterfactual_utilities[i].tolist(),
                actual_perspective_utilities=detail.actual_perspectives[i].tolist(),
                best_perspective_utilities=detail.best_perspectives[i].tolist(),
            )
        )
    return out
