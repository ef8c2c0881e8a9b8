"""Domain errors. Only server/transport/status.py knows which gRPC status each one becomes."""

from __future__ import annotations


class EmbedError(Exception):
    """Base of the errors a request can end with."""


class InvalidInput(EmbedError):
    """The request breaks a rule; `field` names the request field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


class Overloaded(EmbedError):
    """The admission queue is full; the caller may retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EmbedError):
    """The caller's deadline passed before its work could be computed."""


class Unavailable(EmbedError):
    """The server is not ready or is shutting down."""


class OutOfMemory(EmbedError):
    """The device ran out of memory computing a batch (raised by the runner, the batch split by the batcher)."""


class ModelFailure(EmbedError):
    """The model failed while computing a batch this request was in."""


class NonFiniteVector(ModelFailure):
    """The model gave a vector with NaN, infinity or no direction (server.domain.usable_rows) for row `row` of a
    request; it is never returned."""

    def __init__(self, row: int, message: str) -> None:
        super().__init__(message)
        self.row = row


class StartupError(Exception):
    """The server cannot start; the message says why and how to fix it."""
