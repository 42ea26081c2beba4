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
"""

from __future__ import annotations

import collections
import functools
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from redheart import fault_injection
from redheart.codec import TensorValidationError

if TYPE_CHECKING:  # pragma: no cover
    from redheart.config import SecurityConfig, WireConfig

log = logging.getLogger(__name__)

__all__ = [
    "HEALTH_METHOD_PREFIX",
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
    "rpc_method",
    "server_credentials",
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

    def __init__(
        self, service: str, address: str, method: str, code: grpc.StatusCode | None, details: str
    ) -> None:
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


# ----------------------------------------------------------------------------- security

# The standard health service answers without a token, so load balancers and Kubernetes gRPC probes
# (which cannot send headers) work. It reveals only SERVING / NOT_SERVING.
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
_AUTH_HEADER = "authorization"
_UNAUTHENTICATED = (
    "missing or invalid bearer token (fix: give every process the same security.token or security.token_file)"
)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(security: SecurityConfig | None) -> grpc.ServerCredentials | None:
    """TLS credentials of a server (None: plaintext). mTLS when security.require_client_cert."""
    if security is None or not security.tls_enabled:
        return None
    if not (security.tls_cert and security.tls_key):
        # A client-only TLS config (tls_ca alone) cannot serve: fail instead of serving plaintext
        # to clients that expect TLS.
        from redheart.config import ConfigError

        raise ConfigError(
            "security.tls_ca is set but a server needs security.tls_cert and security.tls_key to serve TLS "
            "(fix: give this service its certificate and key, see docs/security.md)"
        )
    pair = [(_read(security.tls_key), _read(security.tls_cert))]
    if security.require_client_cert:
        return grpc.ssl_server_credentials(
            pair, root_certificates=_read(security.tls_ca), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair, root_certificates=None, require_client_auth=False)


def channel_credentials(security: SecurityConfig | None) -> grpc.ChannelCredentials | None:
    """TLS credentials of a client (None: plaintext). Presents tls_cert / tls_key when both are set
    (the client certificate of mutual TLS); verifies the server with tls_ca (or the system roots)."""
    if security is None or not security.tls_enabled:
        return None
    has_pair = bool(security.tls_cert and security.tls_key)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.tls_ca) if security.tls_ca else None,
        private_key=_read(security.tls_key) if has_pair else None,
        certificate_chain=_read(security.tls_cert) if has_pair else None,
    )


def _token(security: SecurityConfig | None) -> str:
    return security.resolved_token() if security is not None else ""


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED.

    The comparison is constant-time (hmac.compare_digest) and neither the expected nor the received
    value ever appears in a status message or a log line. The health service is exempt (see
    HEALTH_METHOD_PREFIX).
    """

    def __init__(self, token: str, exempt_prefixes: Sequence[str] = (HEALTH_METHOD_PREFIX,)) -> None:
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode("ascii")
        self._exempt = tuple(exempt_prefixes)

    def _authorized(self, metadata) -> bool:
        values = [v for k, v in (metadata or ()) if k.lower() == _AUTH_HEADER]
        if len(values) != 1:
            return False
        value = values[0]
        if isinstance(value, str):
            try:
                value = value.encode("ascii")
            except UnicodeEncodeError:
                return False
        return hmac.compare_digest(value, self._expected)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self._exempt):
            return continuation(handler_call_details)
        if self._authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            # Unknown method: the same answer as a known one, so the caller learns nothing.
            return grpc.unary_unary_rpc_method_handler(
                lambda _request, context: context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            )

        # Answer with a handler of the same shape as the real one, so streaming methods fail cleanly.
        def deny(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

        def deny_stream(_request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)
            yield  # pragma: no cover - makes this a generator

        req, resp = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, req, resp)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, req, resp)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, req, resp)
        return grpc.stream_stream_rpc_method_handler(deny_stream, req, resp)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class TokenClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._header = (_AUTH_HEADER, f"Bearer {token}")

    def __repr__(self) -> str:  # never show the token
        return "TokenClientInterceptor(<redacted>)"

    def _details(self, d):
        metadata = [(k, v) for k, v in (d.metadata or ()) if k.lower() != _AUTH_HEADER] + [self._header]
        return _CallDetails(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- retries

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


def make_channel(
    address: str,
    max_message_mb: int,
    security: SecurityConfig | grpc.ChannelCredentials | None = None,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    retry: RetryPolicy | None = None,
) -> grpc.Channel:
    """A channel with the message limits and, from ``security`` ([security]), TLS / mTLS
    credentials and the bearer token on every call. ``credentials`` (or ChannelCredentials passed
    positionally, the old signature) overrides the TLS part. ``retry``: gRPC retries the
    idempotent methods (IDEMPOTENT_METHODS) by that policy, within each call's deadline."""
    if isinstance(security, grpc.ChannelCredentials):
        security, credentials = None, security
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
    if credentials is None:
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
    credentials: grpc.ServerCredentials | None = None,
    *,
    security: SecurityConfig | None = None,
) -> int:
    """Bind host:port (port 0: a free port) and return the port actually bound.

    TLS / mTLS from ``security`` ([security]) unless ``credentials`` are given; plaintext otherwise.
    """
    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    if credentials is None:
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


def rpc_method(fn: Callable) -> Callable:
    """Decorator for servicer methods: map our exceptions to gRPC statuses, keep serving."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except RpcFailure as exc:
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
            return method(request, timeout=timeout, metadata=metadata, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            if loop and code in _RETRYABLE and time.monotonic() + delay < give_up:
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            raise ServiceError(service, address, name, code, details or "") from None


def wait_for_serving(
    address: str,
    *,
    timeout: float,
    service_name: str,
    max_message_mb: int = 4,
    credentials: grpc.ChannelCredentials | None = None,
    metadata=None,
    alive: Callable[[], bool] | None = None,
    security: SecurityConfig | None = None,
) -> None:
    """Poll the standard health service until SERVING; raise a clear error naming the address.

    Over the same TLS / mTLS as the service's other calls when ``security`` says so.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    with make_channel(address, max_message_mb, security, credentials=credentials) as channel:
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
                    metadata=metadata,
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
