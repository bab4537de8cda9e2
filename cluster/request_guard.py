"""A malformed request body is a clear INVALID_ARGUMENT, not an UNKNOWN with a traceback in the
node's log (found by tests/test_rpc_fuzz.py: gRPC decodes the body before any handler runs, and
a DecodeError escaping the deserializer surfaces as UNKNOWN).

The deserializer of every method is wrapped: a body that does not decode becomes a `Malformed`
marker, and the handler (or, for a request stream, the first read of the bad message) aborts
with INVALID_ARGUMENT naming the message type. It sits inside the auth interceptor, so a caller
without a valid token is refused for that first and learns nothing about the body."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from cluster.interceptors import WrappingInterceptor


class Malformed:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _guarded(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    name = method.rsplit("/", 1)[-1]

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 — DecodeError, bad UTF-8, anything the decoder raises
            return Malformed(f"request: the body of {name} is not a valid message ({str(exc)[:200]})")

    return deserialize


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


class RequestGuard(WrappingInterceptor):
    def wraps(self, handler: grpc.RpcMethodHandler) -> bool:
        return handler.request_deserializer is not None

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize = _guarded(handler.request_deserializer, method)
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(request, context):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
        if handler.unary_stream is not None:
            behavior = handler.unary_stream

            async def unary_stream(request, context):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                async for response in behavior(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
        if handler.stream_stream is not None:
            behavior = handler.stream_stream

            async def stream_stream(requests, context):
                async for response in behavior(_checked(requests, context), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
        behavior = handler.stream_unary

        async def stream_unary(requests, context):
            return await behavior(_checked(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
