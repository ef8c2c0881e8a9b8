"""grpc core's server options: its limits above the app's admission control, message sizes, connection age."""

from __future__ import annotations

from server.config import ServerConfig

# grpc core's own limits sit above the app's admission control, so that overload is answered by the app
# (RESOURCE_EXHAUSTED with RetryInfo, from the queue bounded by tokens) and never by core, whose refusals are a
# bare CANCELLED or UNAVAILABLE. Measured with grpcio 1.85 (docs/robustness.md):
# - Calls not yet taken by the server's event loop wait in core's pending list; beyond 1,000 (the default)
#   core CANCELs them: of 2,000 calls started at once ~10% came back CANCELLED, of 5,000 42%. A burst of
#   10,000 raised peak memory by ~170 MB (~17 KiB a call, its handler included), so 16,384 pending calls stay
#   within ~300 MiB. A call waits there at most 30 s (core's default); callers' deadlines are usually shorter.
# - A connection asked for more calls than max_concurrent_streams answers some of them RST_STREAM
#   (REFUSED_STREAM), which clients report as UNAVAILABLE: 5,000 calls on one channel with 4,096 got 12%.
# `maximum_concurrent_rpcs` of grpc.aio.server stays unset: its refusals carry no RetryInfo, and it would
# refuse health probes too. What is admitted is bounded by --max-queue-tokens instead.
_MAX_PENDING_CALLS = 16_384
_GRPC_OPTIONS = [
    # Clients' keepalive pings (ours: every 10 s while calls are open, client.connection) are welcome: core's
    # default takes pings more often than every 5 minutes on a quiet connection as abuse and closes it.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_concurrent_streams", _MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
]


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The server's grpc core options; aged connections make clients re-resolve and reach new replicas."""
    # grpc core refuses larger messages with RESOURCE_EXHAUSTED: keep it above the app's own limit, which
    # answers INVALID_ARGUMENT naming the field.
    core_max = max(64 * 2**20, 2 * config.max_request_bytes)
    # --workers share the port: SO_REUSEPORT then, and only then (else a taken port would not fail the start).
    chosen = {"grpc.max_receive_message_length": core_max, "grpc.so_reuseport": int(config.workers > 1)}
    options = [(k, chosen.get(k, v)) for k, v in _GRPC_OPTIONS]
    if config.max_connection_age_s <= 0:
        return options
    return [*options, ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", round(config.max_connection_age_grace_s * 1000))]
