"""The one table from domain errors to gRPC status codes, with google.rpc error details."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import (
    DeadlineExceeded,
    EmbedError,
    InvalidInput,
    ModelFailure,
    OutOfMemory,
    Overloaded,
    Unavailable,
)

_CODES: dict[type[EmbedError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,  # without RetryInfo: the same text may not fit later
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    ModelFailure: grpc.StatusCode.INTERNAL,
}


def status_code(error: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def message(error: BaseException) -> str:
    if isinstance(error, EmbedError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


def to_rpc_status(error: BaseException) -> grpc.Status:
    code = status_code(error)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message(error))
    if isinstance(error, InvalidInput):
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.description)
        ])
        status.details.add().Pack(detail)
    elif isinstance(error, Overloaded):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> None:
    """End the call with the status for `error` (raises, as context.abort does).

    Trailing metadata set earlier in the call (request id, timings) is kept: abort_with_status would replace it.
    """
    status = to_rpc_status(error)
    try:
        await context.abort(status.code, status.details,
                            (*(context.trailing_metadata() or ()), *status.trailing_metadata))
    except grpc.aio.AbortError:
        raise
    except Exception:
        # The status could not be sent: gRPC had ended the call meanwhile (its deadline passed, or its caller
        # cancelled, while the handler ran on a busy event loop). End the handler as gRPC ends a cancelled one,
        # rather than have grpc log the failed send as a servicer error with a traceback.
        raise asyncio.CancelledError from None
