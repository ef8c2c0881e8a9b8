"""A battery over every server flag and every NOMIC_EMBED_* variable, each as a flag and from the environment.

Every value must end in one of two ways: a ServerConfig that keeps every rule below (written out here, apart
from server/config.py), or exit status 2 with one line on stderr naming the flag, and the variable when the
value came from one. A value refused as a flag is refused from the environment with the same message, and a
value accepted either way gives the same config. A few real `python -m server` starts check the same from
outside: exit 2, one line, no traceback.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import math
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quant.variants import VARIANTS
from server.config import ServerConfig, flag_environment, parse_args
from server.observability.logs import FORMATS, LEVELS

ROOT = Path(__file__).resolve().parents[2]
FLAGS = flag_environment()  # every flag and its variable, from the parser itself
UINT32 = 2**32 - 1
PREFIX = "python -m server: error: "

# -- values -------------------------------------------------------------------------------------------------
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
_numbers = st.one_of(
    st.integers(-(2**40), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),  # nan, inf, -inf, 1e+300, 0.5 ...
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-0", "0.0", " 7 ", "1_000", "0x10", "1e3", "", "-",
                     "9" * 400]),
)


def _ints(low: int, high: int) -> st.SearchStrategy[str]:
    return st.integers(low, high).map(str)


def _floats(low: float, high: float) -> st.SearchStrategy[str]:
    return st.floats(low, high).map(repr)


_tokens = _ints(1, 10**7)
_GOOD: dict[str, st.SearchStrategy[str]] = {
    "--port": _ints(0, 65535),
    "--metrics-port": _ints(0, 65535),
    "--max-input-tokens": st.one_of(st.just("0"), _ints(16, 65536)),
    "--max-texts-per-request": _tokens, "--max-text-chars": _tokens, "--max-batch-tokens": _tokens,
    "--max-batch-rows": _tokens, "--max-request-tokens": _ints(1, 10**6), "--max-queue-tokens": _ints(10**6, 10**9),
    "--max-request-bytes": _ints(1, 2**30 - 1),
    "--batch-wait-ms": _floats(0, 60_000),
    "--grace": _floats(0, 86_400),
    "--max-connection-age": _floats(0, 2_147_483), "--max-connection-age-grace": _floats(0, 2_147_483),
    "--rotary-scaling-factor": st.one_of(st.just("0"), _floats(1, 1e6)),
    "--threads": _ints(0, 64),
    "--cuda-graph-tokens": st.one_of(st.just("0"), _ints(16, 10**6)),
    "--max-memory": st.tuples(st.integers(1, 10**6), st.sampled_from(["", "B", "MiB", "GiB", "mb", "GB"])).map(
        lambda t: f"{t[0]}{t[1]}"),
    "--variant": st.sampled_from(["auto", *VARIANTS]),
    "--device": st.one_of(st.sampled_from(["auto", "cpu", "cuda"]), _ints(0, 16).map(lambda n: f"cuda:{n}")),
    "--log-level": st.sampled_from([*LEVELS, *(level.lower() for level in LEVELS)]),
    "--log-format": st.sampled_from(FORMATS),
    "--event-loop": st.sampled_from(["auto", "uvloop", "asyncio"]),
    "--otlp-endpoint": st.tuples(st.sampled_from(["http", "https"]), st.from_regex(r"[a-z][a-z0-9.-]{0,12}",
                                                                                   fullmatch=True),
                                 _ints(1, 65535)).map(lambda t: f"{t[0]}://{t[1]}:{t[2]}"),
    "--access-log": st.sampled_from(["true", "false", "1", "0", "yes", "no", "on", "off", "TRUE", " On "]),
    "--host": st.sampled_from(["0.0.0.0", "::", "[::]", "127.0.0.1", "::1", "[::1]", "localhost", "fe80::1%eth0",
                               "embed-0.embed.svc.cluster.local", "[localhost]", "host:50051", "a b", "::1]"]),
    "--worker-timeout": _floats(5, 86_400),
    "--worker-start-timeout": _floats(5, 86_400),
}


def _values(flag: str, good_in_10: int = 0) -> st.SearchStrategy[str]:
    """Values meant to be good for the flag, numbers of every shape, and any text (paths and names); with
    `good_in_10`, that many draws in ten are of the first kind."""
    any_kind = st.one_of(_GOOD.get(flag, _text), _numbers, _text)
    return st.integers(1, 10).flatmap(lambda n: _GOOD.get(flag, _text) if n <= good_in_10 else any_kind)


# -- the rules a config must keep ---------------------------------------------------------------------------
_COUNTS = ("max_texts_per_request", "max_text_chars", "max_batch_tokens", "max_batch_rows", "max_request_tokens")
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def _listenable(host: str) -> bool:
    """An IP address without brackets, or a DNS name of letters, digits, '-', '_' and dots."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", host) is not None and ".." not in host


def _broken_rules(c: ServerConfig) -> list[str]:
    seconds = (c.grace_s, c.batch_wait_ms, c.max_connection_age_s, c.max_connection_age_grace_s)
    rules = {
        "port": type(c.port) is int and 0 <= c.port <= 65535,
        "metrics port": c.metrics_port is None or (0 <= c.metrics_port <= 65535
                                                   and (c.metrics_port == 0 or c.metrics_port != c.port)),
        "counts": all(type(getattr(c, n)) is int and 1 <= getattr(c, n) <= UINT32 for n in _COUNTS),
        "queue": 1 <= c.max_queue_tokens < 2**64 and 1 <= c.max_request_bytes < 2**30,
        "input tokens": c.max_input_tokens == 0 or 16 <= c.max_input_tokens <= UINT32,
        "threads": type(c.threads) is int and c.threads >= 0,
        "graph tokens": type(c.cuda_graph_tokens) is int and (c.cuda_graph_tokens == 0
                                                               or 16 <= c.cuda_graph_tokens <= UINT32),
        "durations": all(type(s) is float and math.isfinite(s) and s >= 0 for s in seconds),
        "bounded waits": c.grace_s <= 86_400 and c.batch_wait_ms <= 60_000 and max(seconds[2:]) * 1000 < 2**31,
        "rotary": math.isfinite(c.rotary_scaling_factor) and (c.rotary_scaling_factor == 0
                                                               or c.rotary_scaling_factor >= 1),
        "budgets": (not c.max_input_tokens or min(c.max_batch_tokens, c.max_request_tokens) >= c.max_input_tokens)
        and c.max_queue_tokens >= c.max_request_tokens,
        "memory": c.max_memory_bytes is None or (type(c.max_memory_bytes) is int and c.max_memory_bytes > 0),
        "names": all(v != "" for v in vars(c).values() if isinstance(v, str)),  # paths, hosts, names
        "choices": c.variant in ("auto", *VARIANTS) and c.log_level in LEVELS and c.log_format in FORMATS
        and c.event_loop in ("auto", "uvloop", "asyncio")
        and bool(_DEVICE.fullmatch(c.device)),
        "tls": (c.tls_cert is None) == (c.tls_key is None) and (c.tls_client_ca is None or c.tls_cert is not None),
        "otlp": c.otlp_endpoint is None or c.otlp_endpoint.startswith(("http://", "https://")),
        "access log": type(c.access_log) is bool,
        "host": _listenable(c.host),
        "workers": 1 <= c.workers <= 64 and 5 <= c.worker_timeout_s <= 86_400 and c.worker_index is None
        and 5 <= c.worker_start_timeout_s <= 86_400,
    }
    return [name for name, kept in rules.items() if not kept]


# -- running parse_args -------------------------------------------------------------------------------------
def _argv(flag: str, value: str, spaced: bool) -> list[str]:
    if flag == "--access-log":
        return [flag]
    # `--flag VALUE` cannot carry a value that starts with "-" (argparse takes it for an option, unless it
    # looks like a negative number): `--flag=VALUE` can.
    return [flag, value] if spaced and not value.startswith("-") else [f"{flag}={value}"]


def _parse(argv: Sequence[str], env: Mapping[str, str]) -> ServerConfig | str:
    """The config, or the refusal's stderr once exit status 2 and its one line are checked."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return parse_args(argv, env=env)
        except SystemExit as exc:
            assert exc.code == 2, (argv, env, exc.code)
    text = err.getvalue()
    assert text.startswith(PREFIX) and text.endswith("\n") and text.count("\n") == 1, (argv, env, text)
    return text[len(PREFIX):-1]


def _check(result: ServerConfig | str, counts: Counter[str]) -> None:
    counts["tried"] += 1
    if isinstance(result, ServerConfig):
        counts["accepted"] += 1
        assert not _broken_rules(result), (result, _broken_rules(result))
    else:
        counts["refused"] += 1


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def test_each_flag_alone_as_flag_and_from_the_environment() -> None:
    counts: Counter[str] = Counter()

    @_settings(600)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        flag = data.draw(st.sampled_from(sorted(FLAGS)), label="flag")
        name = FLAGS[flag]
        value = data.draw(_values(flag), label="value")
        from_env = _parse([], {name: value})
        _check(from_env, counts)
        if flag == "--access-log":
            word = value.strip().lower()
            if isinstance(from_env, ServerConfig):
                assert word in ("true", "false", "1", "0", "yes", "no", "on", "off")
                assert from_env.access_log is (word in ("true", "1", "yes", "on"))
            else:
                assert from_env.startswith(f"argument {flag} (from {name}): ")
            return
        from_flag = _parse(_argv(flag, value, data.draw(st.booleans(), label="spaced")), {})
        _check(from_flag, counts)
        if isinstance(from_flag, ServerConfig):
            assert from_env == from_flag  # accepted alike, with the same result
        else:
            # The same message, naming the variable too where the value came from it.
            assert isinstance(from_env, str) and flag in from_flag and f" (from {name})" in from_env, (
                from_flag, from_env)
            assert from_env.replace(f" (from {name})", "") == from_flag

    one()
    print(f"\nflags alone: {dict(counts)}")
    assert counts["refused"] > 100 and counts["accepted"] > 100, counts


def test_flags_together_from_both_sources() -> None:
    counts: Counter[str] = Counter()
    flags = sorted(FLAGS)

    @_settings(400)
    @given(st.data())
    def together(data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(flags), min_size=2, max_size=6, unique=True), label="flags")
        argv: list[str] = []
        env: dict[str, str] = {}
        for flag in chosen:
            value = data.draw(_values(flag, good_in_10=8), label=flag)
            if flag != "--access-log" and data.draw(st.booleans(), label="as flag"):
                argv += _argv(flag, value, data.draw(st.booleans(), label="spaced"))
            else:
                env[FLAGS[flag]] = value
        result = _parse(argv, env)
        _check(result, counts)
        if isinstance(result, str):
            # It names a flag that was set, and a variable only if one was set.
            assert any(flag in result for flag in chosen), result
            for named in re.findall(r"\(from ([A-Z_]+)\)", result):
                assert named in env, (result, env)

    together()
    print(f"flags together: {dict(counts)}")
    assert counts["refused"] > 50 and counts["accepted"] > 10, counts


def test_the_command_line_wins_over_the_environment() -> None:
    assert parse_args(["--port", "9000"], env={"NOMIC_EMBED_PORT": "not a port"}).port == 9000


# -- real starts ---------------------------------------------------------------------------------------------
_STARTS = [
    ([], {"NOMIC_EMBED_PORT": "abc"}, "argument --port (from NOMIC_EMBED_PORT): 'abc' is not an integer"),
    (["--rotary-scaling-factor", "nan"], {}, "argument --rotary-scaling-factor: 'nan' is not 0 (off) or a finite"),
    ([], {"NOMIC_EMBED_ACCESS_LOG": "maybe"}, "argument --access-log (from NOMIC_EMBED_ACCESS_LOG): 'maybe' is not a"),
    ([], {"NOMIC_EMBED_AUTH_TOKENS": " , "}, "NOMIC_EMBED_AUTH_TOKENS holds no token"),
    (["--max-input-tokens", "512"], {"NOMIC_EMBED_MAX_BATCH_TOKENS": "100"},
     "argument --max-batch-tokens (from NOMIC_EMBED_MAX_BATCH_TOKENS): 100 is below --max-input-tokens 512"),
    (["--max-memory", "9" * 400], {}, "argument --max-memory: '9999"),
]


@pytest.mark.parametrize(("argv", "env", "message"), _STARTS)
def test_python_m_server_exits_2_with_one_line(argv: list[str], env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NOMIC_EMBED_", "OTEL_"))}
    proc = subprocess.run([sys.executable, "-m", "server", "--model", "/nonexistent", *argv], cwd=ROOT,
                          env={**clean, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith(PREFIX + message) and proc.stderr.count("\n") == 1, proc.stderr
