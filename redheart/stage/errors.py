"""The errors a stage answers with, typed: the orchestrator decides on them, never on message text.

:class:`ErrorKind` is the stage's side of a one-to-one map to gRPC status codes (the map itself is
in `redheart.stage.wire`, the only stage module that imports grpc). Where recovery needs more than
the code, :class:`ErrorReason` and a culprit travel beside it as trailing metadata
(`redheart.rpc.ERROR_REASON_KEY`, `ERROR_CULPRIT_KEY`). :class:`StepAborted` is the error a round
ends with when its step was aborted."""

from __future__ import annotations

import enum


class ErrorKind(enum.StrEnum):
    """What went wrong, as the client must read it (each kind is exactly one gRPC status code)."""

    PRECONDITION = "precondition"  # FAILED_PRECONDITION: not now, not in this state
    INVALID = "invalid"  # INVALID_ARGUMENT: the request itself is wrong
    DEADLINE = "deadline"  # DEADLINE_EXCEEDED: nothing arrived in time
    ABORTED = "aborted"  # ABORTED: the step was aborted (by the orchestrator or a newer attempt)
    UNAVAILABLE = "unavailable"  # UNAVAILABLE: a service this stage needs is gone
    EXHAUSTED = "exhausted"  # RESOURCE_EXHAUSTED: a configured bound was reached
    INTERNAL = "internal"  # INTERNAL: a bug in this stage


class ErrorReason(enum.StrEnum):
    """Why a FAILED_PRECONDITION: the ones that say "this stage lost or is still finishing our run"
    (so a restart or a retry cures them), not "your request is wrong"."""

    NO_RUN = "no_run"  # the stage knows no run: it restarted on its own (a pod rescheduled)
    OTHER_RUN = "other_run"  # it holds another run (a newer orchestrator took it over)
    ROUND_RUNNING = "round_running"  # it is still inside a round; its lease will end it


TRANSIENT_REASONS = frozenset(ErrorReason)
"""Every reason above is one a retry from the last checkpoint can cure."""


class StageError(Exception):
    """A request this stage cannot serve. `kind` maps to a gRPC status in the servicer; `reason`
    and `culprit` (the service really at fault, e.g. "regret") travel beside it for recovery."""

    def __init__(
        self,
        kind: ErrorKind | str,
        message: str,
        *,
        reason: ErrorReason | None = None,
        culprit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = ErrorKind(kind)  # a plain string must name a kind: ValueError otherwise
        self.reason = reason
        self.culprit = culprit


class StepAborted(StageError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.ABORTED, message)
