"""Running code before and after each call of a grpc.aio handler: the wrapping that interceptors share."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import grpc

S = TypeVar("S")
Begin = Callable[[grpc.aio.ServicerContext], Any]
End = Callable[[grpc.aio.ServicerContext, Any, bool], None]


# A caller's deadline passes on its side first: the server's copy of it starts when the call arrives, later by
# the time the call took to be sent (on a loaded caller, a good part of a second). So a call cancelled this close
# to the server's deadline was, for the caller, DEADLINE_EXCEEDED; one cancelled earlier counts as CANCELLED.
DEADLINE_SLACK_S = 0.25


def final_code(context: grpc.aio.ServicerContext, ok: bool) -> str:
    """The name of the status code a call ended with: the one set (abort, set_code), else what the way it
    ended says (`ok`: the handler returned normally; but a call cancelled meanwhile, as a stream whose
    requests end because its caller's deadline passed, or one past its deadline, was not answered OK)."""
    code = context.code()
    if code is None:
        if context.cancelled() or (ok and _expired(context, 0.0)):
            return "DEADLINE_EXCEEDED" if _expired(context, DEADLINE_SLACK_S) else "CANCELLED"
        return "OK" if ok else "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name  # type: ignore[arg-type]


def _expired(context: grpc.aio.ServicerContext, slack: float) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= slack


def _note_cancelled(context: grpc.aio.ServicerContext) -> None:
    """The handler was cancelled: gRPC ended the call (the caller cancelled it, or its deadline passed) and
    tells the handler nothing else. Say which, for the hooks; the caller is gone, so nothing is sent."""
    if context.code() is None:
        expired = _expired(context, DEADLINE_SLACK_S)
        context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)


def wrap(handler: grpc.RpcMethodHandler, begin: Callable[[grpc.aio.ServicerContext], S],
         end: Callable[[grpc.aio.ServicerContext, S, bool], None]) -> grpc.RpcMethodHandler:
    """`handler` with begin(context) -> state before each call and end(context, state, ok) after it.

    Unary and bidirectional-streaming handlers are wrapped (the server's kinds); others pass unchanged.
    `ok` is whether the handler returned normally; end runs however it ended.
    """
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request: object, context: grpc.aio.ServicerContext) -> object:
            state = begin(context)
            ok = False
            try:
                response = await inner(request, context)
                ok = True
                return response
            except asyncio.CancelledError:
                _note_cancelled(context)
                raise
            finally:
                end(context, state, ok)

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
    if handler.stream_stream:
        inner_stream = handler.stream_stream

        async def stream(requests: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            state = begin(context)
            ok = False
            responses = inner_stream(requests, context)
            try:
                if hasattr(responses, "__aiter__"):
                    async for response in responses:
                        yield response
                else:  # a coroutine handler that writes with context.write (or aborts)
                    await responses
                ok = True
            except (asyncio.CancelledError, GeneratorExit):
                # GeneratorExit: gRPC closed this generator at a `yield`, as it does when the call ended under
                # it (a reply that could not be sent to a caller who cancelled), before context.cancelled() says so.
                _note_cancelled(context)
                raise
            finally:
                try:
                    if hasattr(responses, "aclose"):
                        await responses.aclose()  # the handler's own clean-up now, not when it is collected
                finally:
                    end(context, state, ok)

        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
    return handler


class CallHooks(Protocol):
    """Hooks to run around every call of a method, chosen once per method."""

    def hooks(self, method: str, handler: grpc.RpcMethodHandler) -> tuple[Begin, End]: ...


class HookInterceptor(grpc.aio.ServerInterceptor):
    """Runs several CallHooks around every call: their begins in order, their ends in reverse.

    One wrapping serves them all, made once per method and reused, so a call pays for no interceptor
    chain and no closures of its own. Unknown methods (no handler) are never wrapped, nor remembered.
    """

    def __init__(self, *hooks: CallHooks) -> None:
        self._hooks = hooks
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap(handler, *_compose([h.hooks(method, handler) for h in self._hooks]))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _compose(pairs: Sequence[tuple[Begin, End]]) -> tuple[Begin, End]:
    if len(pairs) == 1:
        return pairs[0]
    begins = [b for b, _ in pairs]
    ends = [e for _, e in reversed(pairs)]

    def begin(context: grpc.aio.ServicerContext) -> list[Any]:
        return [b(context) for b in begins]

    def end(context: grpc.aio.ServicerContext, states: list[Any], ok: bool) -> None:
        for e, state in zip(ends, reversed(states), strict=True):
            e(context, state, ok)

    return begin, end
