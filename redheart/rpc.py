"""gRPC plumbing shared by every service and client: message limits, health, errors, retries.

* Servers and channels get the same send/receive limits (gRPC rejects messages over 4 MiB by
  default; activations of the 200M model are larger).
* Every server registers the standard ``grpc.health.v1`` service: NOT_SERVING until the service
  is ready and again while it shuts down.
* Servicers raise :class:`RpcFailure` (or the codec's TensorValidationError); :func:`rpc_method`
  turns them into a gRPC status with the message intact, so the server keeps serving.
* Clients call through :func:`call` which applies the deadline and turns ``grpc.RpcError`` into
  :class:`ServiceError` naming the service address: the one place where client errors are caught.
* Retries of idempotent calls are gRPC's own: :class:`RetryPolicy` (from ``[wire]``: attempts,
  backoff, status codes) goes into the channel's service config for the methods listed in
  :data:`IDEMPOTENT_METHODS`. :func:`call` keeps a hand-written loop only where the policy cannot
  express the semantics (a retry window longer than one deadline; channels made without a policy).
* Security (``[security]``, docs/security.md) is applied here and only here: callers pass the
  config's ``security`` section to :func:`make_server`, :func:`bind` and :func:`make_channel`, which
  add TLS / mutual TLS credentials and the shared-token check (server) or header (client).
  ``security=None`` (or an empty section) is plaintext without a token, as before.

This module keeps the channel, server, call and health plumbing; the errors live in
:mod:`redheart.rpc_errors`, the retry policy in :mod:`redheart.rpc_retry`, credentials and the token
interceptors in :mod:`redheart.rpc_security`. Every name is re-exported here.
"""

from __future__ import annotations

import hmac  # noqa: F401  (tests patch redheart.rpc.hmac.compare_digest: the module the token check uses)
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from redheart import fault_injection
from redheart.rpc_errors import (
    ERROR_CULPRIT_KEY,
    ERROR_REASON_KEY,
    MAX_STATUS_CHARS,
    RpcFailure,
    ServiceError,
    rpc_method,
)
from redheart.rpc_retry import IDEMPOTENT_METHODS, RetryPolicy, parse_status_codes
from redheart.rpc_security import (
    HEALTH_METHOD_PREFIX,
    TokenAuthInterceptor,
    TokenClientInterceptor,
    _is_loopback,
    _token,
    channel_credentials,
    server_credentials,
)

if TYPE_CHECKING:  # pragma: no cover
    from redheart.config import SecurityConfig

log = logging.getLogger(__name__)

__all__ = [
    "HEALTH_METHOD_PREFIX",
    "IDEMPOTENT_METHODS",
    "ERROR_CULPRIT_KEY",
    "ERROR_REASON_KEY",
    "MAX_STATUS_CHARS",
    "RetryPolicy",
    "RpcFailure",
    "ServiceError",
    "TokenAuthInterceptor",
    "TokenClientInterceptor",
    "bind",
    "call",
    "channel_credentials",
    "channel_options",
    "make_channel",
    "make_server",
    "parse_status_codes",
    "rpc_method",
    "server_credentials",
    "set_serving",
    "wait_for_serving",
]


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


def make_channel(
    address: str,
    max_message_mb: int,
    security: SecurityConfig | None = None,
    *,
    retry: RetryPolicy | None = None,
) -> grpc.Channel:
    """A channel with the message limits and, from ``security`` ([security]), TLS / mTLS
    credentials and the bearer token on every call. ``retry``: gRPC retries the idempotent
    methods (IDEMPOTENT_METHODS) by that policy, within each call's deadline."""
    options = channel_options(max_message_mb)
    service_config = retry.service_config() if retry is not None else None
    if service_config is not None:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", service_config)]
    if retry is not None:
        # Reconnect to a restarting peer on the policy's backoff (gRPC's default grows to 120 s).
        options += [
            ("grpc.initial_reconnect_backoff_ms", max(1, int(retry.initial_backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(retry.max_backoff * 1000))),
        ]
    credentials = channel_credentials(security)
    if security is not None and security.tls_server_name:
        options.append(("grpc.ssl_target_name_override", security.tls_server_name))
    if credentials is not None:
        channel = grpc.secure_channel(address, credentials, options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    token = _token(security)
    if token:
        channel = grpc.intercept_channel(channel, TokenClientInterceptor(token))
    return channel


def make_server(
    *,
    max_message_mb: int,
    max_workers: int = 16,
    max_concurrent_rpcs: int | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    security: SecurityConfig | None = None,
) -> tuple[grpc.Server, health.HealthServicer]:
    """A server with message limits and a health servicer (overall status NOT_SERVING until ready).

    With a token in ``security`` every call but the health service's needs it (UNAUTHENTICATED
    otherwise). The check runs inside the given interceptors, so metrics count refused calls.
    TLS is applied when the port is bound: pass the same ``security`` to :func:`bind`.
    Past ``max_concurrent_rpcs`` calls in flight, grpc answers RESOURCE_EXHAUSTED.
    """
    interceptors = list(interceptors)
    token = _token(security)
    if token:
        interceptors.append(TokenAuthInterceptor(token))
    # Test-only (redheart/fault_injection.py): empty unless REDHEART_TEST_FAULTS names a plan.
    interceptors.extend(fault_injection.server_interceptors())
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=channel_options(max_message_mb)
        + [
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.so_reuseport", 0),
        ],
        interceptors=interceptors,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer


def bind(
    server: grpc.Server,
    host: str,
    port: int,
    *,
    security: SecurityConfig | None = None,
) -> int:
    """Bind host:port (port 0: a free port) and return the port actually bound.

    TLS / mTLS from ``security`` ([security]); plaintext otherwise.
    """
    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    credentials = server_credentials(security)
    if credentials is None and not _is_loopback(host):
        log.warning(
            "listening on %s without TLS: anyone who can reach it can read the traffic%s "
            "(see docs/security.md)",
            target,
            " and the token" if _token(security) else " and drive the service",
        )
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
    method_name: str | None = None,
    channel_retries: bool = False,
) -> Any:
    """Call a unary RPC with a deadline; idempotent calls are retried on UNAVAILABLE with backoff.

    ``channel_retries``: the channel carries a :class:`RetryPolicy`. Then an idempotent call
    without ``retry_until`` is gRPC's alone, with the old loop's meaning ("retry until one
    deadline from now"): ``wait_for_ready`` waits out a peer that refuses connections (a service
    restarting) for the whole deadline, reconnecting on the policy's backoff, and the policy
    retries an UNAVAILABLE answer. A ``retry_until`` window (a time.monotonic() value) stays a
    loop: "a few seconds of retries, each attempt with the full deadline" cannot be expressed by
    the policy (at most 5 attempts inside one deadline), and wait_for_ready would hold a call to a
    dead stage for its full, long deadline instead of those seconds. Without a policy on the
    channel the loop retries until ``retry_until`` or one deadline from now, as before.
    """
    name = method_name or "call"
    give_up = retry_until if retry_until is not None else time.monotonic() + timeout
    loop = idempotent and (not channel_retries or retry_until is not None)
    kwargs = {"wait_for_ready": True} if idempotent and channel_retries and retry_until is None else {}
    delay = 0.05
    while True:
        try:
            # Each attempt gets the full deadline; `give_up` only bounds when a new attempt may start.
            return method(request, timeout=timeout, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if loop and code in _RETRYABLE and time.monotonic() + delay < give_up:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            trailers = dict(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else {}
            raise ServiceError(
                service,
                address,
                name,
                code,
                details or "",
                reason=trailers.get(ERROR_REASON_KEY),
                culprit=trailers.get(ERROR_CULPRIT_KEY),
            ) from None


def wait_for_serving(
    address: str,
    *,
    timeout: float,
    service_name: str,
    max_message_mb: int = 4,
    alive: Callable[[], bool] | None = None,
    security: SecurityConfig | None = None,
) -> None:
    """Poll the standard health service until SERVING; raise a clear error naming the address.

    Over the same TLS / mTLS as the service's other calls when ``security`` says so.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    with make_channel(address, max_message_mb, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ServiceError(
                    service_name, address, "Health/Check", None, "the process exited before becoming healthy"
                )
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(2.0, max(0.1, deadline - time.monotonic())),
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.1)
    raise ServiceError(
        service_name,
        address,
        "Health/Check",
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"not SERVING after {timeout:.0f}s (last: {last}); is it running and reachable?",
    )
