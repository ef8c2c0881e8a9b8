"""Per-response timings as trailing metadata: lower-case keys, decimal values (milliseconds, counts).

The values are the ones the embedder measured (server.domain.Timings), the same that ResponseMetadata
carries and the metrics observe: nothing is timed twice.
"""

from __future__ import annotations

from server.domain import EmbedResult

QUEUE_MS = "x-embed-queue-ms"  # waiting for the model
INFERENCE_MS = "x-embed-inference-ms"  # the model computing this request's rows
TOTAL_MS = "x-embed-total-ms"  # arrival to answer (a stream: its whole duration)
TOKENS = "x-embed-tokens"  # tokens read, all texts together (a stream: all messages answered)

Trailers = tuple[tuple[str, str], ...]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f}"


def result_trailers(result: EmbedResult) -> Trailers:
    """What an answered Embed call reports."""
    t = result.timings
    return ((QUEUE_MS, _ms(t.queue_s)), (INFERENCE_MS, _ms(t.inference_s)), (TOTAL_MS, _ms(t.total_s)),
            (TOKENS, str(result.total_tokens)))


def elapsed_trailers(seconds: float, tokens: int | None = None) -> Trailers:
    """What a failed call or a whole stream reports: the time taken and, when known, the tokens read."""
    if tokens is None:
        return ((TOTAL_MS, _ms(seconds)),)
    return ((TOTAL_MS, _ms(seconds)), (TOKENS, str(tokens)))
