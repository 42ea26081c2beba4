"""The errors a stage answers with: :class:`StageError` carries the kind the servicer maps to a gRPC
status; :class:`StepAborted` is the one a round ends with when its step was aborted."""

from __future__ import annotations


class StageError(Exception):
    """A request this stage cannot serve. `kind` maps to a gRPC status in the servicer."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "precondition" | "invalid" | "deadline" | "aborted" | "unavailable" | "internal"


class StepAborted(StageError):
    def __init__(self, message: str) -> None:
        super().__init__("aborted", message)
