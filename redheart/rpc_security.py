"""Security of the gRPC plumbing (part of :mod:`redheart.rpc`, which re-exports every name here).

``[security]`` (docs/security.md) is applied by ``redheart.rpc``'s make_server, bind and make_channel
with what is here: TLS / mutual TLS credentials and the shared-token check (server) or header (client).
``security=None`` (or an empty section) is plaintext without a token.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:  # pragma: no cover
    from redheart.config import SecurityConfig

__all__ = [
    "HEALTH_METHOD_PREFIX",
    "TokenAuthInterceptor",
    "TokenClientInterceptor",
    "channel_credentials",
    "server_credentials",
]


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
