from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import (
    DEFAULT_MODEL,
    DEFAULT_PORT,
    ConfigError,
    ServerConfig,
    build_config,
    flag_environment,
    parse_args,
)
from server.flag_values import parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    config = parse_args([], env={})
    assert (config.model, config.port, config.variant) == (DEFAULT_MODEL, DEFAULT_PORT, "auto")
    assert config.rotary_scaling_factor == 2.0


def test_flags_and_environment() -> None:
    config = parse_args(["--port", "9000", "--max-memory", "1.5GiB"], env={"NOMIC_EMBED_VARIANT": "fp32",
                                                                           "NOMIC_EMBED_PORT": "7000"})
    assert config.port == 9000 and config.variant == "fp32" and config.max_memory_bytes == int(1.5 * 2**30)


@pytest.mark.parametrize(("text", "size"), [("800MiB", 800 * 2**20), ("2GB", 2 * 10**9), ("1024", 1024),
                                          ("10TiB", 10 * 2**40), ("1tb", 10**12)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-batch-rows", "0"], ["--max-memory", "lots"]])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, env={})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m server: error: ") and argv[0] in err


def _refusal(argv: list[str], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(argv, env or {})
    return str(info.value)


# (flag, value): values each flag refused before, from the environment or as a flag, or both.
BAD_VALUES = [
    ("--port", "abc"), ("--port", "65536"), ("--port", "-1"), ("--metrics-port", "65536"), ("--metrics-port", "-1"),
    ("--log-level", "loud"), ("--log-format", "xml"), ("--variant", "fp64"), ("--device", "cuda:x"),
    ("--rotary-scaling-factor", "nan"), ("--rotary-scaling-factor", "inf"), ("--rotary-scaling-factor", "-1"),
    ("--rotary-scaling-factor", "0.5"), ("--grace", "-1"), ("--grace", "nan"), ("--grace", "inf"),
    ("--batch-wait-ms", "nan"), ("--batch-wait-ms", "-0.5"), ("--batch-wait-ms", "1e300"),
    ("--max-connection-age", "nan"), ("--max-connection-age", "-inf"), ("--max-connection-age", "1e9"),
    ("--max-connection-age-grace", "inf"), ("--max-input-tokens", "8"), ("--max-input-tokens", "15"),
    ("--max-input-tokens", "-1"), ("--threads", "-1"), ("--cuda-graph-tokens", "15"), ("--event-loop", "trio"),
    ("--cuda-graph-tokens", "-1"), ("--cuda-graph-tokens", "lots"), ("--max-memory", "0"), ("--max-memory", "9" * 400),
    ("--max-batch-tokens", "4294967296"), ("--max-request-bytes", "1073741824"), ("--model", ""),
    ("--tls-key", ""), ("--otlp-endpoint", "collector"), ("--otlp-endpoint", "http://a:99999"),
    ("--host", "[localhost]"), ("--host", "10.0.0.1:50051"), ("--host", "a b"), ("--worker-timeout", "0"),
    # Digits of other scripts and underscores, which Python's int() and float() read: 50051, 1000, 1.5.
    ("--port", "\u0665\u0660\u0660\u0665\u0661"), ("--max-batch-rows", "1_000"), ("--grace", "\u0661.\u0665"),
    ("--rotary-scaling-factor", "\u0662"), ("--max-queue-tokens", "\uff11\uff10\uff10"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_a_bad_value_is_refused_alike_as_flag_and_as_environment(flag: str, value: str) -> None:
    name = flag_environment()[flag]
    from_flag = _refusal([f"{flag}={value}"])
    from_env = _refusal([], {name: value})
    assert from_flag.startswith(f"argument {flag}: ")
    assert from_env == from_flag.replace(f"argument {flag}:", f"argument {flag} (from {name}):", 1)


def test_every_float_flag_refuses_non_finite_values() -> None:
    floats = [a.option_strings[0] for a in _actions() if a.default is not None and isinstance(a.default, float)]
    assert len(floats) == 7
    for flag in floats:
        for value in ("nan", "inf", "-inf", "1e400"):
            assert _refusal([flag, value]).startswith(f"argument {flag}: ")


def _actions() -> list[argparse.Action]:
    from server.config import _options, _parser

    return _options(_parser())


@pytest.mark.parametrize(("value", "factor"), [("0", 0.0), ("1", 1.0), ("2", 2.0), ("4.5", 4.5)])
def test_rotary_scaling_factor_is_off_or_at_least_one(value: str, factor: float) -> None:
    assert build_config(["--rotary-scaling-factor", value], {}).rotary_scaling_factor == factor


def test_max_input_tokens_below_the_request_minimum_is_refused_naming_it() -> None:
    message = _refusal(["--max-input-tokens", "15"])
    assert "--max-input-tokens" in message and "16" in message
    assert build_config(["--max-input-tokens", "16"], {}).max_input_tokens == 16
    assert build_config([], {"NOMIC_EMBED_MAX_INPUT_TOKENS": "0"}).max_input_tokens == 0


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--max-input-tokens", "8192", "--max-batch-tokens", "4096"], {},
     ["argument --max-batch-tokens: 4096", "--max-input-tokens 8192"]),
    (["--max-batch-tokens", "4096"], {"NOMIC_EMBED_MAX_INPUT_TOKENS": "8192"},
     ["argument --max-batch-tokens: 4096", "--max-input-tokens 8192 (from NOMIC_EMBED_MAX_INPUT_TOKENS)"]),
    (["--max-input-tokens", "512", "--max-request-tokens", "100"], {},
     ["argument --max-request-tokens: 100", "--max-input-tokens 512"]),
    (["--max-queue-tokens", "1000"], {},
     ["argument --max-queue-tokens: 1000", "--max-request-tokens 262144"]),
    ([], {"NOMIC_EMBED_MAX_QUEUE_TOKENS": "100", "NOMIC_EMBED_MAX_REQUEST_TOKENS": "200"},
     ["argument --max-queue-tokens (from NOMIC_EMBED_MAX_QUEUE_TOKENS): 100",
      "--max-request-tokens 200 (from NOMIC_EMBED_MAX_REQUEST_TOKENS)"]),
    (["--port", "9000", "--metrics-port", "9000"], {}, ["argument --metrics-port: 9000", "--port 9000"]),
])
def test_budgets_that_contradict_each_other_are_refused_naming_both(
        argv: list[str], env: dict[str, str], named: list[str]) -> None:
    message = _refusal(argv, env)
    assert all(part in message for part in named), message


def test_budgets_that_agree_are_accepted() -> None:
    config = build_config(["--max-input-tokens", "512", "--max-batch-tokens", "512", "--max-request-tokens", "512",
                           "--max-queue-tokens", "512"], {})
    assert (config.max_batch_tokens, config.max_request_tokens, config.max_queue_tokens) == (512, 512, 512)


@pytest.mark.parametrize(("word", "value"), [("true", True), ("Yes", True), ("1", True), ("ON", True),
                                             ("false", False), ("no", False), ("0", False), ("off", False)])
def test_boolean_variables_take_known_words(word: str, value: bool) -> None:
    assert build_config([], {"NOMIC_EMBED_ACCESS_LOG": word}).access_log is value


@pytest.mark.parametrize("word", ["maybe", "", "2", "enabled"])
def test_boolean_variables_refuse_other_words(word: str) -> None:
    message = _refusal([], {"NOMIC_EMBED_ACCESS_LOG": word})
    assert message.startswith("argument --access-log (from NOMIC_EMBED_ACCESS_LOG): ") and "boolean" in message


def test_a_flag_given_on_the_command_line_wins_over_a_bad_variable() -> None:
    assert build_config(["--port", "9000"], {"NOMIC_EMBED_PORT": "abc"}).port == 9000


@pytest.mark.parametrize("tokens", [" , ", "", ",", " "])
def test_auth_tokens_variable_without_a_token_is_refused(tokens: str) -> None:
    assert "NOMIC_EMBED_AUTH_TOKENS holds no token" in _refusal([], {"NOMIC_EMBED_AUTH_TOKENS": tokens})


def test_auth_tokens_variable_is_kept_and_never_shown() -> None:
    config = build_config([], {"NOMIC_EMBED_AUTH_TOKENS": "a, b"})
    assert config.auth_tokens_env == "a, b" and "a, b" not in repr(config)
    message = _refusal([], {"NOMIC_EMBED_AUTH_TOKENS": "good,s\u00e9cret"})
    assert "token 2" in message and "cret" not in message


@pytest.mark.parametrize(("argv", "named"), [
    (["--tls-cert", "a.crt"], "argument --tls-cert: TLS needs --tls-key too"),
    (["--tls-key", "a.key"], "argument --tls-key: TLS needs --tls-cert too"),
    (["--tls-client-ca", "ca.crt"], "argument --tls-client-ca: client certificates need TLS"),
])
def test_incomplete_tls_settings_are_refused(argv: list[str], named: str) -> None:
    assert _refusal(argv).startswith(named)


def test_otel_variables_are_checked_naming_them() -> None:
    message = _refusal([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317"})
    assert message.startswith("argument --otlp-endpoint (from OTEL_EXPORTER_OTLP_ENDPOINT): ")
    assert build_config([], {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).otlp_endpoint is None
    assert build_config([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c:4317"}).otlp_endpoint == "https://c:4317"


def test_sizes_too_large_for_a_float_are_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="too large"):
        parse_size("9" * 400)


def test_every_flag_has_its_variable() -> None:
    names = flag_environment()
    assert names["--max-batch-tokens"] == "NOMIC_EMBED_MAX_BATCH_TOKENS" and names["--grace"] == "NOMIC_EMBED_GRACE"
    # All but auth_tokens_env, and the two the --workers supervisor passes its workers (never a user's)
    assert len(names) == len(ServerConfig.__dataclass_fields__) - 3


def test_the_load_test_starts_its_server_with_flags_the_server_accepts() -> None:
    """`make loadtest` passes these to `python -m server`: a validation rule must not break it."""
    from loadtest.__main__ import DEFAULT_SERVER_ARGS

    config = parse_args(["--model", "m", *DEFAULT_SERVER_ARGS.split()], env={})
    assert config.max_queue_tokens == 4096 >= config.max_request_tokens


@pytest.mark.parametrize(("name", "suggestion"), [("NOMIC_EMBED_AUTH_TOKEN", "NOMIC_EMBED_AUTH_TOKENS"),
                                                  ("NOMIC_EMBED_MAX_BATCH_TOKEN", "NOMIC_EMBED_MAX_BATCH_TOKENS")])
def test_a_misspelt_variable_is_refused_not_ignored(name: str, suggestion: str) -> None:
    """NOMIC_EMBED_AUTH_TOKEN (singular) would otherwise serve without authentication."""
    with pytest.raises(ConfigError, match=f"unknown variable {name}; did you mean {suggestion}"):
        build_config([], {name: "x"})


def test_the_clients_variables_are_not_the_servers_business() -> None:
    build_config([], {"NOMIC_EMBED_TARGET": "localhost:50051", "NOMIC_EMBED_TOKEN": "t"})


@pytest.mark.parametrize("value", ["9" * 305 + "GiB", "1" * 309 + "KB"])
def test_a_size_that_overflows_with_its_unit_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="too large a size"):
        build_config(["--max-memory", value], {})


def test_a_request_byte_limit_no_request_fits_is_refused() -> None:
    with pytest.raises(ConfigError, match="1024"):
        build_config(["--max-request-bytes", "5"], {})


def test_help_lists_every_flag_with_true_defaults() -> None:
    """--help goes through the parser that marks defaults for build_config: each flag, and no marker shown."""
    shown = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "1000"})  # no wrapping inside a phrase
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert all(flag in shown.stdout for flag in flag_environment()) and "object at 0x" not in shown.stdout
    assert "(default 16384)" in shown.stdout and "(default 30)" in shown.stdout
