"""Retry policy of the gRPC channels (part of :mod:`redheart.rpc`, which re-exports every name here).

Retries of idempotent calls are gRPC's own: :class:`RetryPolicy` (from ``[wire]``: attempts,
backoff, status codes) goes into the channel's service config for the methods listed in
:data:`IDEMPOTENT_METHODS`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:  # pragma: no cover
    from redheart.config import WireConfig

__all__ = ["IDEMPOTENT_METHODS", "RetryPolicy", "parse_status_codes"]


# Methods that are safe to send twice, per gRPC service. The stage caches RunStep / ApplyStep
# results per (run, step, round), drops duplicate pushes, and Describe / Save / Load / Abort /
# GetParameters repeat to the same state; a repeated StartRun re-creates the same state (same
# seed, same first step). Scoring is a pure function of the request.
IDEMPOTENT_METHODS: dict[str, tuple[str, ...]] = {
    "redheart.v1.PipelineStage": (
        "Describe",
        "StartRun",
        "RunStep",
        "ApplyStep",
        "AbortStep",
        "PushTensor",
        "SaveState",
        "LoadState",
        "GetParameters",
    ),
    "redheart.v1.RegretService": ("Score",),
}


def parse_status_codes(text: str) -> tuple[str, ...]:
    """ "UNAVAILABLE, RESOURCE_EXHAUSTED" -> ("UNAVAILABLE", "RESOURCE_EXHAUSTED"); names checked."""
    names = tuple(part.strip().upper() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError('needs at least one status code, e.g. "UNAVAILABLE"')
    valid = {c.name for c in grpc.StatusCode} - {"OK"}
    for name in names:
        if name not in valid:
            import difflib

            close = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{name!r} is not a gRPC status code{hint}; codes: {', '.join(sorted(valid))}")
    return names


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy (gRFC A6) for the idempotent methods of a channel."""

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    status_codes: tuple[str, ...] = ("UNAVAILABLE",)

    @classmethod
    def from_wire(cls, wire: WireConfig) -> RetryPolicy:
        return cls(
            wire.retry_max_attempts,
            wire.retry_initial_backoff_seconds,
            wire.retry_max_backoff_seconds,
            wire.retry_backoff_multiplier,
            parse_status_codes(wire.retry_status_codes),
        )

    def service_config(self, methods: Mapping[str, Sequence[str]] = IDEMPOTENT_METHODS) -> str | None:
        """The channel's service config JSON, or None when retries are off (one attempt)."""
        if self.max_attempts < 2:  # gRPC refuses a retry policy with fewer than 2 attempts
            return None
        names = [{"service": service, "method": m} for service, ms in methods.items() for m in ms]
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff:.6f}s",
            "maxBackoff": f"{self.max_backoff:.6f}s",
            "backoffMultiplier": self.multiplier,
            "retryableStatusCodes": list(self.status_codes),
        }
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})
