"""Errors of the gRPC plumbing (part of :mod:`redheart.rpc`, which re-exports every name here).

* Servicers raise :class:`RpcFailure` (or the codec's TensorValidationError); :func:`rpc_method`
  turns them into a gRPC status with the message intact, so the server keeps serving.
* Clients see :class:`ServiceError` naming the service address (raised by ``redheart.rpc.call``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import grpc

from redheart.codec import TensorValidationError

# The logger of redheart.rpc before the split, so log configuration and filters keep matching.
log = logging.getLogger("redheart.rpc")

__all__ = [
    "ERROR_CULPRIT_KEY",
    "ERROR_REASON_KEY",
    "MAX_STATUS_CHARS",
    "RpcFailure",
    "ServiceError",
    "rpc_method",
]

# Trailing metadata beside a status, for what a client must decide on besides the code (recovery
# never reads message text): why a FAILED_PRECONDITION (redheart.stage.errors.ErrorReason), and
# which service really failed when it is not the one answering ("regret": the GPU stage's regret
# service went away).
ERROR_REASON_KEY = "redheart-error-reason"
ERROR_CULPRIT_KEY = "redheart-error-culprit"


class RpcFailure(Exception):
    """Raised inside a servicer: becomes the gRPC status `code` with `message` (and `reason` /
    `culprit` as trailing metadata, when given)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, *, reason: str | None = None, culprit: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.culprit = culprit

    def trailers(self) -> tuple[tuple[str, str], ...]:
        pairs = ((ERROR_REASON_KEY, self.reason), (ERROR_CULPRIT_KEY, self.culprit))
        return tuple((k, str(v)) for k, v in pairs if v)


class ServiceError(RuntimeError):
    """A call to another service failed; the message names the service, the address and the status."""

    def __init__(
        self,
        service: str,
        address: str,
        method: str,
        code: grpc.StatusCode | None,
        details: str,
        *,
        reason: str | None = None,
        culprit: str | None = None,
    ) -> None:
        self.service = service
        self.address = address
        self.method = method
        self.code = code
        self.details = details
        self.reason = reason  # the server's ERROR_REASON_KEY trailer, if any
        self.culprit = culprit  # the server's ERROR_CULPRIT_KEY trailer, if any
        code_name = code.name if code is not None else "ERROR"
        super().__init__(f"{service} at {address}: {method} failed with {code_name}: {details}")


def rpc_method(fn: Callable) -> Callable:
    """Decorator for servicer methods: map our exceptions to gRPC statuses, keep serving."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except RpcFailure as exc:
            if exc.trailers():
                context.set_trailing_metadata(exc.trailers())
            context.abort(exc.code, _bounded(exc.message))
        except TensorValidationError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _bounded(str(exc)))
        except grpc.RpcError:
            raise  # context.abort() raises this; let it through
        except Exception as exc:  # a bug or an unexpected state: report it, do not die
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, _bounded(f"{fn.__name__}: {type(exc).__name__}: {exc}"))

    return wrapper


MAX_STATUS_CHARS = 2000
"""A status message travels in the trailers, whose size gRPC limits (8 KiB by default): past it the
client gets RESOURCE_EXHAUSTED "metadata size exceeds limit" instead of the real status. The
services clip what they echo (wire.max_error_chars); this is the last bound."""


def _bounded(message: str) -> str:
    return (
        message
        if len(message) <= MAX_STATUS_CHARS
        else message[:MAX_STATUS_CHARS] + f"... ({len(message)} characters)"
    )
