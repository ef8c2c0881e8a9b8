"""Request ids: taken from the caller's `x-request-id` or made up, set for the call's log lines, sent back.

The id goes back as trailing metadata on every answer, errors included (server.transport.status keeps it when it
aborts). With `--access-log`, one line per RPC names the method, the status code and the time taken;
never request contents.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence

import grpc

from server.observability.logs import REQUEST_ID
from server.transport.rpc_hooks import Begin, End, final_code

HEADER = "x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(rf"[\x20-\x7e]{{1,{MAX_LENGTH}}}")  # printable ASCII: safe in any log format

access_log = logging.getLogger("server.access")

Metadata = Sequence[tuple[str, str | bytes]] | None


def request_id(metadata: Metadata) -> str:
    """The caller's id when it sent a valid one (printable ASCII, at most MAX_LENGTH), else a new uuid4 hex."""
    for key, value in metadata or ():
        if key == HEADER:
            if isinstance(value, str) and _VALID.fullmatch(value):
                return value
            break
    return _uuid4_hex()


# uuid4's version and variant bits, set on 128 random bits: uuid.uuid4().hex without building a UUID.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def _uuid4_hex() -> str:
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


def add_trailers(context: grpc.aio.ServicerContext, pairs: Sequence[tuple[str, str]]) -> None:
    """Append to the call's trailing metadata (setting it replaces what was set before)."""
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *pairs))


class RequestIdHooks:
    """Gives unary and bidirectional-streaming RPCs a request id; optionally logs one line per RPC."""

    def __init__(self, access: bool = False) -> None:
        self.access = access
        if access:  # asked for by --access-log: these lines whatever --log-level keeps of the others
            access_log.setLevel(logging.INFO)

    def hooks(self, method: str, handler: grpc.RpcMethodHandler) -> tuple[Begin, End]:
        def begin(context: grpc.aio.ServicerContext) -> float:
            rid = request_id(context.invocation_metadata())
            REQUEST_ID.set(rid)  # in the RPC's own task: nothing to reset afterwards
            add_trailers(context, ((HEADER, rid),))
            return time.monotonic()

        def end(context: grpc.aio.ServicerContext, started: float, ok: bool) -> None:
            if self.access:
                ms = (time.monotonic() - started) * 1000
                code = final_code(context, ok)
                access_log.info("%s %s %.2fms", method, code, ms,
                                extra={"fields": {"method": method, "code": code, "duration_ms": round(ms, 3)}})

        return begin, end
