"""The client's one error type, with what the server's rich status says (field at fault, retry hint)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class EmbedError(Exception):
    """A call failed: `code` is the gRPC status code, `details` the server's message, `field` the request
    field at fault (when the server named one) and `retry_after_s` the server's hint for a retry."""

    def __init__(self, code: grpc.StatusCode, details: str, *, field: str = "",
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.field = field
        self.retry_after_s = retry_after_s


def from_rpc_error(error: grpc.RpcError) -> EmbedError:
    """Works for blocking and asyncio calls alike (both expose code, details and trailing metadata)."""
    code, details = error.code(), error.details() or ""
    field, retry_after_s = "", None
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status detail that disagrees with the status: ignore the detail
        status = None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            field = bad.field_violations[0].field if bad.field_violations else ""
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after_s = info.retry_delay.ToNanoseconds() / 1e9
    return EmbedError(code, details, field=field, retry_after_s=retry_after_s)


def status_code(number: int) -> grpc.StatusCode:
    """grpc.StatusCode from its number (google.rpc.Code), UNKNOWN for numbers it does not know."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def client_closed() -> EmbedError:
    """How a stream ends when its client is closed under it, whichever way the close reached it."""
    return EmbedError(grpc.StatusCode.CANCELLED, "the client was closed while this stream was open")
