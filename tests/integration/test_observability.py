"""Timings and request ids in trailing metadata, JSON logs, and OpenTelemetry traces, from real servers."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tools.servers import RunningServer, free_port, running_server, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
TIMING_KEYS = ("x-embed-queue-ms", "x-embed-inference-ms", "x-embed-total-ms")
ROUNDING_MS = 0.002  # three values, each rounded to the microsecond


def _trailers(call: grpc.Call | grpc.RpcError) -> dict[str, str]:
    return {k: v for k, v in call.trailing_metadata() if isinstance(v, str)}  # type: ignore[union-attr]


def _ms(duration: object) -> float:
    return duration.ToNanoseconds() / 1e6  # type: ignore[attr-defined]


def test_embed_answers_carry_timings_tokens_and_the_callers_request_id(tiny_server: RunningServer) -> None:
    stub = embed_pb2_grpc.EmbedServiceStub(tiny_server.channel())
    request = pb.EmbedRequest(texts=["timings in trailers", "and a second text"], task=pb.TASK_SEARCH_QUERY)
    reply, call = stub.Embed.with_call(request, metadata=(("x-request-id", "order-42/a b"),), timeout=10)
    trailers = _trailers(call)
    assert trailers["x-request-id"] == "order-42/a b"
    queue, inference, total = (float(trailers[k]) for k in TIMING_KEYS)
    assert queue >= 0 and inference > 0 and queue + inference <= total + ROUNDING_MS
    assert int(trailers["x-embed-tokens"]) == reply.metadata.total_tokens > 0
    # The same measurements as the response's metadata, not a second clock.
    m = reply.metadata
    assert (queue, inference, total) == pytest.approx((_ms(m.queue_time), _ms(m.inference_time),
                                                      _ms(m.total_time)), abs=ROUNDING_MS)


def test_a_request_id_is_made_up_when_missing_or_unusable(tiny_server: RunningServer) -> None:
    stub = embed_pb2_grpc.EmbedServiceStub(tiny_server.channel())
    request = pb.EmbedRequest(texts=["id"], task=pb.TASK_CLUSTERING)
    ids = []
    for metadata in ((), (("x-request-id", "x" * 129),), (("x-request-id", ""),)):
        _, call = stub.Embed.with_call(request, metadata=metadata, timeout=10)
        ids.append(_trailers(call)["x-request-id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    _, call = stub.Info.with_call(pb.InfoRequest(), metadata=(("x-request-id", "info-1"),), timeout=10)
    assert _trailers(call)["x-request-id"] == "info-1"


def test_errors_carry_the_total_time_and_request_id_beside_the_rich_status(tiny_server: RunningServer) -> None:
    stub = embed_pb2_grpc.EmbedServiceStub(tiny_server.channel())
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(texts=["x"], task=pb.TASK_CLUSTERING, dimensions=3),
                   metadata=(("x-request-id", "bad-1"),), timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    trailers = _trailers(error)
    assert trailers["x-request-id"] == "bad-1"
    assert float(trailers["x-embed-total-ms"]) >= 0
    assert "x-embed-inference-ms" not in trailers  # nothing was computed
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    violation = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violation) and violation.field_violations[0].field == "dimensions"


def test_refused_calls_carry_the_request_id_too(tiny_original: Path) -> None:
    with running_server(str(tiny_original), auth_tokens_env="s3cret") as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
        with pytest.raises(grpc.RpcError) as caught:
            stub.Info(pb.InfoRequest(), metadata=(("x-request-id", "no-token-1"),), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert _trailers(caught.value)["x-request-id"] == "no-token-1"


def test_stream_messages_carry_timings_and_the_trailers_the_totals(tiny_server: RunningServer) -> None:
    stub = embed_pb2_grpc.EmbedServiceStub(tiny_server.channel())
    messages = [
        pb.EmbedStreamRequest(id="a", request=pb.EmbedRequest(texts=["one", "two"], task=pb.TASK_CLUSTERING)),
        pb.EmbedStreamRequest(id="bad", request=pb.EmbedRequest(texts=["x"])),  # no task: a StreamError
        pb.EmbedStreamRequest(id="b", request=pb.EmbedRequest(texts=["three"], task=pb.TASK_CLUSTERING)),
    ]
    started = time.monotonic()
    call = stub.EmbedStream(iter(messages), metadata=(("x-request-id", "stream-7"),), timeout=20)
    replies = list(call)
    elapsed_ms = (time.monotonic() - started) * 1000
    assert [r.WhichOneof("result") for r in replies] == ["response", "error", "response"]
    for r in (replies[0], replies[2]):
        m = r.response.metadata
        assert _ms(m.queue_time) + _ms(m.inference_time) <= _ms(m.total_time) + ROUNDING_MS
    trailers = _trailers(call)  # type: ignore[arg-type]
    assert trailers["x-request-id"] == "stream-7"
    assert int(trailers["x-embed-tokens"]) == sum(r.response.metadata.total_tokens for r in replies) > 0
    assert 0 < float(trailers["x-embed-total-ms"]) <= elapsed_ms


def _wait_serving(port: int, proc: subprocess.Popen[str]) -> None:
    wait_until_serving(f"127.0.0.1:{port}", lambda: proc.poll() is None, timeout=120)


# Runs `python -m server`'s main() and reports, at exit, whether any OpenTelemetry module was loaded.
_MAIN = ("import atexit, sys\n"
         "atexit.register(lambda: print('opentelemetry loaded:', any(m.startswith('opentelemetry') "
         "for m in sys.modules), file=sys.stderr))\n"
         "from server.__main__ import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def test_json_logs_carry_the_request_id_and_no_texts(tiny_original: Path) -> None:
    port, secret = free_port(), "confidential-record-5678"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _MAIN, "--model", str(tiny_original), "--host", "127.0.0.1", "--port", str(port),
         "--threads", "1", "--variant", "fp32", "--log-format", "json", "--access-log"],
        cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**env, "HF_HUB_OFFLINE": "1"},
    )
    try:
        _wait_serving(port, proc)
        stub = embed_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        _, call = stub.Embed.with_call(pb.EmbedRequest(texts=[secret], task=pb.TASK_SEARCH_DOCUMENT),
                                       metadata=(("x-request-id", "json-log-1"),), timeout=10)
        assert _trailers(call)["x-request-id"] == "json-log-1"
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(texts=[secret]), metadata=(("x-request-id", "json-log-2"),), timeout=10)
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = err.splitlines()
    assert lines.pop() == "opentelemetry loaded: False"
    entries = [json.loads(line) for line in lines if line.strip()]  # every line is one JSON object
    assert all({"timestamp", "level", "logger", "message"} <= e.keys() for e in entries)
    access = {e["request_id"]: e for e in entries if e["logger"] == "server.access"}
    assert access["json-log-1"]["code"] == "OK"
    assert access["json-log-1"]["method"] == "/nomic_embed.v1.EmbedService/Embed"
    assert access["json-log-2"]["code"] == "INVALID_ARGUMENT"
    assert all(isinstance(e["duration_ms"], float) for e in access.values())
    assert any(e["message"].startswith("SERVING") and "request_id" not in e for e in entries)
    assert secret not in err


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[trace_pb2.Span] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def _collector() -> Iterator[tuple[_Collector, int]]:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, port
    finally:
        server.stop(None)


def _attributes(span: trace_pb2.Span) -> dict[str, object]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def test_traces_reach_an_otlp_collector_and_continue_the_callers_trace(tiny_original: Path) -> None:
    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
    with _collector() as (collector, port):
        with running_server(str(tiny_original), otlp_endpoint=f"http://127.0.0.1:{port}") as srv:
            stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
            reply = stub.Embed(pb.EmbedRequest(texts=["traced", "twice"], task=pb.TASK_CLUSTERING),
                               metadata=(("traceparent", traceparent), ("x-request-id", "traced-1")), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Embed(pb.EmbedRequest(texts=["x"]), timeout=10)
            messages = [pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(texts=["s"], task=pb.TASK_RAW))
                        for i in range(2)]
            assert len(list(stub.EmbedStream(iter(messages), timeout=20))) == 2
            health_pb2_grpc.HealthStub(srv.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10)
        # Leaving the server flushed its spans.
        spans = list(collector.spans)
    by_name: dict[str, list[trace_pb2.Span]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert not [name for name in by_name if "Health" in name]  # probes are not traced
    rpcs = by_name["/nomic_embed.v1.EmbedService/Embed"]
    (traced,) = [s for s in rpcs if s.trace_id == trace_id.to_bytes(16, "big")]
    assert traced.parent_span_id == parent_id.to_bytes(8, "big")
    assert traced.kind == trace_pb2.Span.SPAN_KIND_SERVER
    (failed,) = [s for s in rpcs if s is not traced]
    # The caller's mistake: recorded as the status code, not as a server error (OpenTelemetry's convention).
    assert _attributes(failed)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    embeds = by_name["nomic_embed.embed"]
    assert len(embeds) == 3  # the Embed and two stream messages; the failed call never reached the model
    (embed,) = [s for s in embeds if s.parent_span_id == traced.span_id]
    (stream,) = by_name["/nomic_embed.v1.EmbedService/EmbedStream"]
    assert [s.parent_span_id for s in embeds].count(stream.span_id) == 2  # one per stream message
    assert embed.trace_id == traced.trace_id
    attributes = _attributes(embed)
    assert attributes["embed.tokens"] == reply.metadata.total_tokens
    assert attributes["embed.texts"] == 2
    assert attributes["embed.variant"] == "fp32"
    assert attributes["embed.request_id"] == "traced-1"
    assert traced.start_time_unix_nano <= embed.start_time_unix_nano <= embed.end_time_unix_nano
    assert embed.end_time_unix_nano <= traced.end_time_unix_nano


def test_the_access_log_is_written_at_any_log_level(tiny_original: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--access-log with --log-level WARNING: the refused call is still in the log."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # as --log-level sets it; caplog's handler, like the server's, takes any level
    try:
        with running_server(str(tiny_original), access_log=True) as srv, pytest.raises(grpc.RpcError):
            embed_pb2_grpc.EmbedServiceStub(srv.channel()).Embed(pb.EmbedRequest(texts=[""]), timeout=10)
    finally:
        root.setLevel(level)
    lines = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert any(line.startswith("/nomic_embed.v1.EmbedService/Embed INVALID_ARGUMENT ") for line in lines), lines
