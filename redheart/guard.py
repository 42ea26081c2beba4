"""Guards every service puts in front of its handlers (issue 11: no input reaches an internal error).

* :func:`add_parsing_handlers` registers a servicer with handlers that receive the raw request
  bytes and parse them themselves: bytes that are not the request type get INVALID_ARGUMENT naming
  the type, instead of grpc's own INTERNAL "Exception deserializing request!".
* :class:`CallBudget` keeps server threads free for the calls that must never wait behind a round
  (health checks, AbortStep): past its budget, any other call is answered RESOURCE_EXHAUSTED at once.
* :func:`clip` bounds a piece of a request echoed in an error message (a 1 MB abort reason or a
  100 kB tensor name would otherwise push the status past gRPC's metadata limit).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

__all__ = ["CallBudget", "add_parsing_handlers", "clip"]


def clip(text: Any, limit: int = 200) -> str:
    """``text`` (str() of it) cut to ``limit`` characters, saying how long it was."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _parsing(behavior, request_cls, streaming: bool):
    name = request_cls.DESCRIPTOR.full_name

    def parse(raw: bytes, context):
        try:
            return request_cls.FromString(raw)
        except (DecodeError, RecursionError, ValueError) as exc:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {name} ({len(raw)} bytes): {clip(exc, 200)}",
            )

    if streaming:

        def stream(raw, context):
            yield from behavior(parse(raw, context), context)

        return stream

    def unary(raw, context):
        return behavior(parse(raw, context), context)

    return unary


def add_parsing_handlers(server: grpc.Server, servicer: Any, service) -> None:
    """Register ``servicer``'s methods of ``service`` (a ServiceDescriptor) on ``server``; each
    handler parses its own request (see the module docstring). Unary and server-streaming only."""
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        if method.client_streaming:
            raise ValueError(f"{service.full_name}/{method.name}: client streaming is not supported here")
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _parsing(behavior, request_cls, True),
                request_deserializer=None,
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _parsing(behavior, request_cls, False),
                request_deserializer=None,
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


class CallBudget(grpc.ServerInterceptor):
    """At most ``limit`` calls in progress at once, except the ``exempt`` methods (full names).

    The server's thread pool is shared by every call; calls that block (a RunStep waiting on its
    peer, a StartRun behind it) could otherwise take every thread, and then a health check or the
    AbortStep that would free them waits in the queue until the client's deadline. Keep ``limit``
    below the pool size: the difference is reserved for the exempt methods."""

    def __init__(self, limit: int, exempt: Iterable[str]) -> None:
        if limit < 1:
            raise ValueError(f"CallBudget limit {limit} must be at least 1")
        self.limit = limit
        self.exempt = frozenset(exempt)
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in self.exempt:
            return handler
        slots, limit, method = self._slots, self.limit, handler_call_details.method

        def busy(context):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{method}: {limit} calls are in progress on this server; retry later",
            )

        def unary(behavior):
            def wrapped(request, context):
                if not slots.acquire(blocking=False):
                    busy(context)
                try:
                    return behavior(request, context)
                finally:
                    slots.release()

            return wrapped

        def stream(behavior):
            def wrapped(request, context):
                if not slots.acquire(blocking=False):
                    busy(context)
                try:
                    yield from behavior(request, context)
                finally:
                    slots.release()

            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler
