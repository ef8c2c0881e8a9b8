"""Log formats, request ids, timing trailers and the observability flags, each on its own."""

from __future__ import annotations

import io
import json
import logging
import re
import uuid
import warnings
from collections.abc import Iterator

import huggingface_hub.utils
import numpy as np
import pytest
from transformers.utils import logging as transformers_logging

from server.config import parse_args
from server.domain import Embedding, EmbedResult, Timings
from server.observability import logs
from server.transport import trailers as timings
from server.transport.request_ids import MAX_LENGTH, request_id


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    bars = transformers_logging.is_progress_bar_enabled()
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    yield
    root.handlers[:], root.level = handlers, level
    logging.captureWarnings(False)
    transformers_logging.enable_default_handler()
    transformers_logging.disable_propagation()
    if bars:
        transformers_logging.enable_progress_bar()
    if hub_bars:
        huggingface_hub.utils.enable_progress_bars()


def _log_through(fmt: str, request: str | None) -> str:
    stream = io.StringIO()
    logs.configure("INFO", fmt, stream)
    token = logs.REQUEST_ID.set(request)
    try:
        logging.getLogger("server.example").info("answered %d texts", 3, extra={"fields": {"code": "OK"}})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("server.example").exception("failed")
    finally:
        logs.REQUEST_ID.reset(token)
    return stream.getvalue()


def test_json_lines_carry_level_logger_request_id_fields_and_exceptions(restore_logging: None) -> None:
    first, second = (json.loads(line) for line in _log_through("json", "req-1").splitlines())
    assert first["level"] == "INFO" and first["logger"] == "server.example"
    assert first["message"] == "answered 3 texts" and first["request_id"] == "req-1" and first["code"] == "OK"
    assert first["timestamp"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]


def test_outside_a_request_there_is_no_request_id(restore_logging: None) -> None:
    entry = json.loads(_log_through("json", None).splitlines()[0])
    assert "request_id" not in entry
    assert "[request_id=" not in _log_through("text", None)


def test_text_lines_name_the_request(restore_logging: None) -> None:
    first = _log_through("text", "req-2").splitlines()[0]
    assert " INFO server.example: answered 3 texts [request_id=req-2]" in first


def test_library_warnings_become_json_lines(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream)
    warnings.warn("a library complains", UserWarning, stacklevel=1)
    (entry,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert entry["logger"] == "py.warnings" and "a library complains" in entry["message"]


@pytest.mark.parametrize("value", ["abc-123", "0af7651916cd43dd8448eb211c80319c", "a b/c:d", "x" * MAX_LENGTH])
def test_a_valid_caller_id_is_kept(value: str) -> None:
    assert request_id((("other", "x"), ("x-request-id", value))) == value


@pytest.mark.parametrize("value", ["", "x" * (MAX_LENGTH + 1), "tab\there", "line\nbreak", "café", b"bytes"])
def test_an_unusable_caller_id_is_replaced(value: str | bytes) -> None:
    made = request_id((("x-request-id", value),))
    assert made != value and re.fullmatch(r"[0-9a-f]{32}", made) and uuid.UUID(hex=made).version == 4


def test_timing_trailers_are_milliseconds_and_counts() -> None:
    vector = np.zeros(4, np.float32)
    result = EmbedResult([Embedding(vector, 5, False, 1), Embedding(vector, 7, False, 1)],
                         Timings(queue_s=0.0015, inference_s=0.0125, total_s=0.02))
    assert dict(timings.result_trailers(result)) == {
        "x-embed-queue-ms": "1.500", "x-embed-inference-ms": "12.500", "x-embed-total-ms": "20.000",
        "x-embed-tokens": "12",
    }
    assert dict(timings.elapsed_trailers(0.25)) == {"x-embed-total-ms": "250.000"}
    assert dict(timings.elapsed_trailers(1.0, tokens=9)) == {"x-embed-total-ms": "1000.000", "x-embed-tokens": "9"}
    assert all(k == k.lower() and k.isascii() for k, _ in timings.result_trailers(result))


def test_observability_flags() -> None:
    config = parse_args([], env={})
    assert (config.log_level, config.log_format, config.access_log, config.otlp_endpoint) == (
        "INFO", "text", False, None)
    config = parse_args(["--log-level", "debug", "--log-format", "json", "--access-log",
                         "--otlp-endpoint", "http://collector:4317"], env={})
    assert (config.log_level, config.log_format, config.access_log, config.otlp_endpoint) == (
        "DEBUG", "json", True, "http://collector:4317")


@pytest.mark.parametrize(("env", "access", "endpoint"), [
    ({"NOMIC_EMBED_ACCESS_LOG": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317"}, True, "http://a:4317"),
    ({"NOMIC_EMBED_ACCESS_LOG": "0", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}, False, "http://traces:4317"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "NOMIC_EMBED_OTLP_ENDPOINT": "http://b:4317"}, False,
     "http://b:4317"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_SDK_DISABLED": "true"}, False, None),
])
def test_observability_from_the_environment(env: dict[str, str], access: bool, endpoint: str | None) -> None:
    config = parse_args([], env=env)
    assert (config.access_log, config.otlp_endpoint) == (access, endpoint)


@pytest.mark.parametrize("argv", [["--log-format", "xml"], ["--log-level", "loud"]])
def test_bad_log_flags_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv, env={})
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("caller_id", ['a ] [request_id=forged', 'say "hi"', "back\\slash", "[x]"])
def test_a_text_line_cannot_be_given_a_forged_request_id(restore_logging: None, caller_id: str) -> None:
    assert request_id((("x-request-id", caller_id),)) == caller_id  # printable ASCII: kept as sent
    first = _log_through("text", caller_id).splitlines()[0]
    fields = re.findall(r'\[request_id=("(?:[^"\\]|\\.)*"|[^\]\s]*)\]', first)
    assert len(fields) == 1 and first.endswith(f"[request_id={fields[0]}]")
    assert json.loads(fields[0]) == caller_id  # quoted as a JSON string would be, and read back whole
