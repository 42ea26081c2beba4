"""gRPC plumbing shared by every service and client: message limits, health, errors, retries.

* Servers and channels get the same send/receive limits (gRPC rejects messages over 4 MiB by
  default; activations of the 200M model are larger).
* Every server registers the standard ``grpc.health.v1`` service: NOT_SERVING until the service
  is ready and again while it shuts down.
* Servicers raise :class:`RpcFailure` (or the codec's TensorValidationError); :func:`rpc_method`
  turns them into a gRPC status with the message intact, so the server keeps serving.
* Clients call through :func:`call` which applies the deadline, retries idempotent calls on
  UNAVAILABLE with backoff, and turns ``grpc.RpcError`` into :class:`ServiceError` naming the
  service address: the one place where client errors are caught.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from redheart.codec import TensorValidationError

log = logging.getLogger(__name__)

__all__ = [
    "RpcFailure",
    "ServiceError",
    "call",
    "channel_options",
    "make_channel",
    "make_server",
    "rpc_method",
    "wait_for_serving",
]


class RpcFailure(Exception):
    """Raised inside a servicer: becomes the gRPC status `code` with `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ServiceError(RuntimeError):
    """A call to another service failed; the message names the service, the address and the status."""

    def __init__(self, service: str, address: str, method: str, code: grpc.StatusCode | None, details: str) -> None:
        self.service = service
        self.address = address
        self.method = method
        self.code = code
        self.details = details
        code_name = code.name if code is not None else "ERROR"
        super().__init__(f"{service} at {address}: {method} failed with {code_name}: {details}")


def channel_options(max_message_mb: int) -> list[tuple[str, Any]]:
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Keep idle peer channels alive across long steps without tripping server ping limits.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def make_channel(address: str, max_message_mb: int, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    options = channel_options(max_message_mb)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def make_server(
    *,
    max_message_mb: int,
    max_workers: int = 16,
    max_concurrent_rpcs: int | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[grpc.Server, health.HealthServicer]:
    """A server with message limits and a health servicer (overall status NOT_SERVING until ready)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=channel_options(max_message_mb)
        + [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ],
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer


def bind(server: grpc.Server, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind host:port (port 0: a free port) and return the port actually bound."""
    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(target, credentials)
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {target}: {exc} (is another process using the port?)") from None
    if bound == 0:
        raise OSError(f"cannot listen on {target} (is another process using the port?)")
    return bound


def set_serving(health_servicer: health.HealthServicer, serving: bool, services: Iterable[str] = ()) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    health_servicer.set("", status)
    for name in services:
        health_servicer.set(name, status)


def rpc_method(fn: Callable) -> Callable:
    """Decorator for servicer methods: map our exceptions to gRPC statuses, keep serving."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except RpcFailure as exc:
            context.abort(exc.code, exc.message)
        except TensorValidationError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.RpcError:
            raise  # context.abort() raises this; let it through
        except Exception as exc:  # a bug or an unexpected state: report it, do not die
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__}: {type(exc).__name__}: {exc}")

    return wrapper


_RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


def call(
    method: Callable,
    request: Any,
    *,
    service: str,
    address: str,
    timeout: float,
    idempotent: bool = False,
    retry_until: float | None = None,
    metadata: Sequence[tuple[str, str]] | None = None,
    method_name: str | None = None,
) -> Any:
    """Call a unary RPC with a deadline; retry idempotent calls on UNAVAILABLE with backoff.

    ``retry_until`` (a time.monotonic() value) bounds the retries; default: one deadline from now.
    """
    name = method_name or "call"
    give_up = retry_until if retry_until is not None else time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            # Each attempt gets the full deadline; `give_up` only bounds when a new attempt may start.
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if idempotent and code in _RETRYABLE and time.monotonic() + delay < give_up:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            raise ServiceError(service, address, name, code, details or "") from None


def wait_for_serving(address: str, *, timeout: float, service_name: str, max_message_mb: int = 4,
                     credentials: grpc.ChannelCredentials | None = None, metadata=None,
                     alive: Callable[[], bool] | None = None) -> None:
    """Poll the standard health service until SERVING; raise a clear error naming the address."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with make_channel(address, max_message_mb, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ServiceError(service_name, address, "Health/Check", None, "the process exited before becoming healthy")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=min(2.0, max(0.1, deadline - time.monotonic())), metadata=metadata)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.1)
    raise ServiceError(service_name, address, "Health/Check", grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"not SERVING after {timeout:.0f}s (last: {last}); is it running and reachable?")


class StopFlag:
    """A settable flag shared by a server's threads (SIGTERM handling)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)
