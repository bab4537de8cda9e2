"""The shape every server interceptor of ours shares: wrap a method's handler once, on its first
call, and reuse the wrapped handler (the wrapper reads the per-call context when it runs)."""

from __future__ import annotations

from typing import Any

import grpc


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not self.wraps(handler):
            return handler
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = wrapped
        return wrapped

    def wraps(self, handler: grpc.RpcMethodHandler) -> bool:
        return True

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError
