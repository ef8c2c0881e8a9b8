"""Server configuration: one frozen object, built once from argv and the environment."""

from __future__ import annotations

import argparse
import difflib
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from quant.memory import MIN_GRAPH_TOKENS
from quant.variants import VARIANTS
from server.domain import MIN_MAX_TOKENS
from server.engine.policy import BatchPolicy
from server.flag_values import (
    UINT32,
    device,
    event_loop,
    integer,
    listen_host,
    memory,
    number,
    otlp_endpoint,
    rotary_factor,
    shown,
    text,
    zero_or_at_least,
)
from server.observability.logs import FORMATS, LEVELS
from server.transport.tokens import AUTH_TOKENS_ENV, split_tokens

DEFAULT_MODEL = "nomic-ai/nomic-embed-text-v1.5"
DEFAULT_PORT = 50051

ENV_PREFIX = "NOMIC_EMBED_"
# Variables of the same prefix that are not server flags: the client's, and the token list.
_OTHER_VARIABLES = frozenset({"NOMIC_EMBED_TARGET", "NOMIC_EMBED_TOKEN"})
# A one-text request with its options takes a few dozen bytes: a smaller limit would refuse every request.
MIN_REQUEST_BYTES = 1024


@dataclass(frozen=True)
class ServerConfig:
    model: str = DEFAULT_MODEL
    # A branch, tag or commit of a hub id; None = main (or what the cache's refs/main names).
    revision: str | None = None
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    variant: str = "auto"
    device: str = "auto"
    max_memory_bytes: int | None = None
    # Tokens per text; 0 = what the model supports (8192 for nomic-embed-text-v1.5).
    max_input_tokens: int = 0
    max_texts_per_request: int = 2048
    max_text_chars: int = 1_000_000
    max_batch_tokens: int = BatchPolicy.max_batch_tokens
    max_batch_rows: int = BatchPolicy.max_batch_rows
    max_queue_tokens: int = BatchPolicy.max_queue_tokens
    max_request_tokens: int = 262_144
    max_request_bytes: int = 16 * 2**20
    batch_wait_ms: float = 0.0
    threads: int = 0  # intra-op threads of the model; 0 = the cores this process may use
    # Padded tokens of the largest batch replayed as a CUDA graph (server.model.buckets); 0 = no graphs.
    cuda_graph_tokens: int = 16384
    # Dynamic NTK factor beyond the trained positions (the model card's long-context setting).
    rotary_scaling_factor: float = 2.0
    grace_s: float = 30.0
    # After this age the server sends GOAWAY (grpc core adds +-10% jitter) so clients reconnect and spread over
    # replicas that came up since; calls in flight get the age grace to finish. 0 = connections never age.
    max_connection_age_s: float = 300.0
    max_connection_age_grace_s: float = 30.0
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None = off, 0 = a free port
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # set: clients must present a certificate signed by this CA (mTLS)
    auth_token_file: str | None = None
    # Comma-separated tokens from NOMIC_EMBED_AUTH_TOKENS: kept off argv, where `ps` would show them.
    auth_tokens_env: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    log_format: str = "text"  # text, or json: one object per line
    access_log: bool = False  # one log line per RPC: method, status code, duration, request id
    event_loop: str = "auto"  # uvloop when installed, else asyncio's (server.event_loop)
    # OTLP/gRPC collector for traces (http://host:4317); None = no tracing, and OpenTelemetry stays unloaded.
    otlp_endpoint: str | None = None
    workers: int = 1  # server processes sharing the port (server.supervisor)
    # A worker whose event loop has not told its supervisor it is alive for this long is killed (hung or stopped).
    worker_timeout_s: float = 30.0
    worker_start_timeout_s: float = 900.0  # a download of the model and a compile fit; a hung load does not
    # Set by the supervisor on each of its workers, never by hand: which one it is, and the pipe it tells
    # that it is SERVING on.
    worker_index: int | None = None
    ready_fd: int | None = None

    def address(self, port: int) -> str:
        """--host with `port`, as grpc and logs write it."""
        return host_port(self.host, port)


def host_port(host: str, port: int) -> str:
    """host:port, an IPv6 address bracketed ([::1]:50051)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# Upper bounds, where a larger value would break something rather than be merely unusual.
_UINT64 = 2**64 - 1
# grpc core takes message sizes as a C int, and its limit is set to twice this one (server.transport.options).
_MAX_REQUEST_BYTES = (2**31 - 1) // 2
# grpc core takes connection ages in milliseconds as a C int (about 24.8 days).
_MAX_CONNECTION_AGE_S = float((2**31 - 1) // 1000)
# Workers say they are alive once a second (server.supervisor): a shorter timeout would take a moment's lag
# under load for a hang.
_MIN_WORKER_TIMEOUT_S = 5.0
_MAX_GRACE_S = 86_400.0  # a day; the drain's waits also have to fit threading.TIMEOUT_MAX
# Rows wait this long for company only while a batch is not full; a minute outlasts any sensible deadline.
_MAX_BATCH_WAIT_MS = 60_000.0
MAX_WORKERS = 64
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_UNSET = object()  # not a string: argparse would run a string default through the flag's type


class ConfigError(Exception):
    """A flag or environment value refused; the message is one line naming the flag (and variable)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m server", description="Serve text embeddings over gRPC.",
                epilog=f"Each flag can also be set as {ENV_PREFIX}<FLAG> in the environment (e.g. "
                       f"{ENV_PREFIX}MAX_BATCH_TOKENS); a flag given on the command line wins.")
    d = ServerConfig()
    tokens, count, port = integer(1, UINT32), integer(1, UINT32), integer(0, 65535)
    p.add_argument("--model", type=text, default=d.model,
                   help="hub id, local directory in the hub layout, or all-minilm-l6-v2 (bundled, works offline)")
    p.add_argument("--revision", type=text, default=None,
                   help="branch, tag or commit of the hub id to serve (default main); reported by Info")
    p.add_argument("--host", type=listen_host, default=d.host,
                   help="address to listen on (default 0.0.0.0; :: for IPv6 and IPv4)")
    p.add_argument("--port", type=port, default=d.port, help="0 picks a free port")
    p.add_argument("--variant", choices=("auto", *VARIANTS), default=d.variant,
                   help="auto, or a variant name (see quant.variants)")
    p.add_argument("--device", type=device, default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-memory", type=memory, default=None, dest="max_memory_bytes",
                   help="cap on weights + workspace (+ CUDA graphs), e.g. 1.5GiB")
    p.add_argument("--max-input-tokens", type=zero_or_at_least(
                       MIN_MAX_TOKENS, "the model's limit", f"every request asks for at least {MIN_MAX_TOKENS} "
                       "tokens per text"), default=d.max_input_tokens,
                   help=f"tokens per text; 0 = the model's limit, else at least {MIN_MAX_TOKENS}")
    p.add_argument("--max-texts-per-request", type=count, default=d.max_texts_per_request)
    p.add_argument("--max-text-chars", type=count, default=d.max_text_chars)
    p.add_argument("--max-batch-tokens", type=tokens, default=d.max_batch_tokens,
                   help="padded tokens (rows x longest row) per model batch; at least --max-input-tokens")
    p.add_argument("--max-batch-rows", type=count, default=d.max_batch_rows)
    p.add_argument("--max-request-tokens", type=tokens, default=d.max_request_tokens,
                   help="tokens per request, all texts together (beyond it: INVALID_ARGUMENT); "
                        "at least --max-input-tokens")
    p.add_argument("--max-request-bytes", type=integer(MIN_REQUEST_BYTES, _MAX_REQUEST_BYTES),
                   default=d.max_request_bytes,
                   help="serialized bytes per request (beyond it: INVALID_ARGUMENT)")
    p.add_argument("--max-queue-tokens", type=integer(1, _UINT64), default=d.max_queue_tokens,
                   help="tokens admitted but not yet computed; beyond it requests get RESOURCE_EXHAUSTED, except "
                        "from a connection with nothing queued, admitted up to twice it; at least "
                        "--max-request-tokens")
    p.add_argument("--batch-wait-ms", type=number(0, _MAX_BATCH_WAIT_MS, "milliseconds"), default=d.batch_wait_ms,
                   help="how long an idle worker waits to fill a batch")
    p.add_argument("--threads", type=integer(0, UINT32), default=d.threads,
                   help="intra-op threads of the model; 0 = the CPUs this process may use, and no more (a batch "
                        "too small to share runs on one)")
    p.add_argument("--cuda-graph-tokens", default=d.cuda_graph_tokens, type=zero_or_at_least(
                   MIN_GRAPH_TOKENS, "no CUDA graphs", f"the smallest graph holds {MIN_GRAPH_TOKENS} tokens"),
                   help=f"CUDA: batches of up to this many padded tokens (default {d.cuda_graph_tokens}) replay "
                        "CUDA graphs captured at start, in the memory the batch budget leaves; 0 = none")
    p.add_argument("--rotary-scaling-factor", type=rotary_factor, default=d.rotary_scaling_factor,
                   help="dynamic NTK factor for inputs beyond the trained positions: 1 or more; 0 disables")
    p.add_argument("--grace", type=number(0, _MAX_GRACE_S, "seconds"), default=d.grace_s, dest="grace_s",
                   help="seconds admitted work may take to finish on shutdown")
    age = number(0, _MAX_CONNECTION_AGE_S, "seconds")
    p.add_argument("--max-connection-age", type=age, default=d.max_connection_age_s, dest="max_connection_age_s",
                   help="seconds before the server asks a client to reconnect (rebalancing over replicas); 0 = never")
    p.add_argument("--max-connection-age-grace", type=age, default=d.max_connection_age_grace_s,
                   dest="max_connection_age_grace_s", help="seconds calls in flight on an aged connection may take")
    p.add_argument("--event-loop", type=event_loop, default=d.event_loop,
                   help="auto (uvloop when installed), uvloop or asyncio")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=d.log_level)
    p.add_argument("--log-format", choices=FORMATS, default=d.log_format,
                   help="json: one JSON object per line, with the request id of the call that wrote it")
    p.add_argument("--access-log", action="store_true", default=d.access_log,
                   help="log one line per RPC: method, status code, duration, request id (never texts); "
                        f"in the environment: true or false ({ENV_PREFIX}ACCESS_LOG=true)")
    p.add_argument("--otlp-endpoint", type=otlp_endpoint, default=None,
                   help="send OpenTelemetry traces over OTLP/gRPC, e.g. http://collector:4317 (needs the "
                        "[tracing] extra); default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT")
    p.add_argument("--metrics-port", type=port, default=None,
                   help="serve Prometheus metrics over HTTP on this port (on --host); off by default; with "
                        "--workers, every worker's, labelled worker=\"i\"")
    p.add_argument("--workers", type=integer(1, MAX_WORKERS), default=d.workers,
                   help="server processes sharing --port, each with a model of its own, started one after "
                        "another, each within its share of the memory (default 1)")
    p.add_argument("--worker-timeout", type=number(_MIN_WORKER_TIMEOUT_S, _MAX_GRACE_S, "seconds"),
                   default=d.worker_timeout_s, dest="worker_timeout_s",
                   help="with --workers: a worker whose event loop has been silent this long (hung, or stopped) is "
                        "killed and the others stopped, for the process manager to restart the whole "
                        f"(default {d.worker_timeout_s:g})")
    p.add_argument("--worker-start-timeout", type=number(_MIN_WORKER_TIMEOUT_S, _MAX_GRACE_S, "seconds"),
                   default=d.worker_start_timeout_s, dest="worker_start_timeout_s",
                   help="with --workers: a worker not SERVING this long after it was started (a load that hangs) "
                        "is killed and the others stopped, for the process manager to restart the whole "
                        f"(default {d.worker_start_timeout_s:g})")
    internal = integer(0, UINT32)
    p.add_argument("--worker-index", type=internal, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=internal, default=None, help=argparse.SUPPRESS)
    p.add_argument("--tls-cert", type=text, default=None, help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", type=text, default=None, help="PEM private key")
    p.add_argument("--tls-client-ca", type=text, default=None,
                   help="PEM CA bundle; requires client certificates (mTLS)")
    p.add_argument("--auth-token-file", type=text, default=None,
                   help="file of bearer tokens, one per line; calls need 'authorization: Bearer <token>' "
                        f"(health checks stay open). {AUTH_TOKENS_ENV} adds comma-separated tokens")
    return p


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The flags a user sets, each also from the environment (not the supervisor's own, which it passes)."""
    return [a for a in parser._actions if a.option_strings and a.dest != "help" and a.help is not argparse.SUPPRESS]


def flag_environment() -> dict[str, str]:
    """Each flag and the environment variable that sets it: {"--port": "NOMIC_EMBED_PORT", ...}."""
    return {a.option_strings[0]: _env_name(a) for a in _options(_parser())}


def _env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.option_strings[0].lstrip("-").replace("-", "_").upper()


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config from argv and NOMIC_EMBED_<FLAG> variables (argv wins); on a bad value print one line
    naming the flag (and the variable it came from) and exit with status 2."""
    try:
        return build_config(argv, env)
    except ConfigError as exc:
        message = " ".join(str(exc).splitlines())
        print(f"python -m server: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def build_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerConfig:
    """parse_args without the exit: raises ConfigError. Flags and variables go through the same parser,
    so a value is refused the same way, with the same message, wherever it comes from."""
    env = os.environ if env is None else env
    parser = _parser()
    options = _options(parser)
    # With a marker for defaults the parser tells what argv gave; ServerConfig supplies the rest.
    parser.set_defaults(**{a.dest: _UNSET for a in options})
    values = {k: v for k, v in vars(parser.parse_args(list(argv))).items() if v is not _UNSET}
    sources: dict[str, str] = {}
    for action in options:
        name = _env_name(action)
        if action.dest not in values and name in env:
            values[action.dest] = _from_env(parser, action, name, env[name])
            sources[action.dest] = name
    if "otlp_endpoint" not in values:
        name, endpoint = _otel_endpoint(env)
        if endpoint is not None:
            (action,) = [a for a in options if a.dest == "otlp_endpoint"]
            values["otlp_endpoint"] = _from_env(parser, action, name, endpoint)
            sources["otlp_endpoint"] = name
    _refuse_unknown_variables(env, {_env_name(a) for a in options} | {AUTH_TOKENS_ENV} | _OTHER_VARIABLES)
    tokens = env.get(AUTH_TOKENS_ENV)
    if tokens is not None:
        try:
            split_tokens(tokens, AUTH_TOKENS_ENV)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    config = ServerConfig(**values, auth_tokens_env=tokens)
    _check(config, {a.dest: a.option_strings[0] for a in options}, sources, set(values))
    return config


def _refuse_unknown_variables(env: Mapping[str, str], known: set[str]) -> None:
    """A misspelt variable would be ignored (NOMIC_EMBED_AUTH_TOKEN would serve without authentication)."""
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; the server reads {ENV_PREFIX}<FLAG> for its flags"
        raise ConfigError(f"unknown variable {unknown[0]}{hint}")


def _from_env(parser: argparse.ArgumentParser, action: argparse.Action, name: str, value: str) -> object:
    """A variable's value, through the flag's own conversion and checks; errors name both."""
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        word = value.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ConfigError(f"argument {flag} (from {name}): {shown(value)} is not a boolean; "
                              "use true or false (or 1/0, yes/no, on/off)")
        return word in _TRUE
    try:
        return getattr(parser.parse_args([f"{flag}={value}"]), action.dest)  # the others stay _UNSET
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"argument {flag}:", f"argument {flag} (from {name}):", 1)) from None


def _otel_endpoint(env: Mapping[str, str]) -> tuple[str, str | None]:
    """The standard OpenTelemetry variables (empty counts as unset, as OpenTelemetry has it), unless
    OTEL_SDK_DISABLED=true: (the variable's name, its value or None)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "", None
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if env.get(name):
            return name, env[name]
    return "", None


def _check(config: ServerConfig, flags: Mapping[str, str], sources: Mapping[str, str], given: set[str]) -> None:
    """What no single value breaks but two together do; `given`: the settings argv or the environment set."""

    def flag(dest: str) -> str:
        return f"{flags[dest]} (from {sources[dest]})" if dest in sources else flags[dest]

    def setting(dest: str) -> str:
        quoted = f"{flags[dest]} {getattr(config, dest)}"
        return f"{quoted} (from {sources[dest]})" if dest in sources else quoted

    def refuse(dest: str, message: str) -> NoReturn:
        raise ConfigError(f"argument {flag(dest)}: {message}")

    c = config
    if c.max_input_tokens:
        if c.max_batch_tokens < c.max_input_tokens:
            refuse("max_batch_tokens", f"{c.max_batch_tokens} is below {setting('max_input_tokens')}, so a text "
                   f"of that length would not fit a batch; raise it to {c.max_input_tokens} or lower "
                   "--max-input-tokens")
        if c.max_request_tokens < c.max_input_tokens:
            refuse("max_request_tokens", f"{c.max_request_tokens} is below {setting('max_input_tokens')}, so a "
                   f"request of one text of that length would be refused; raise it to {c.max_input_tokens} or "
                   "lower --max-input-tokens")
    if c.max_queue_tokens < c.max_request_tokens:
        refuse("max_queue_tokens", f"{c.max_queue_tokens} is below {setting('max_request_tokens')}, so a request "
               f"within that limit would be admitted only into an empty queue; raise it to {c.max_request_tokens} "
               "or lower --max-request-tokens")
    if c.metrics_port and c.metrics_port == c.port:
        refuse("metrics_port", f"{c.metrics_port} is the gRPC port too ({setting('port')}); choose another")
    if (c.tls_cert is None) != (c.tls_key is None):
        given, missing = ("tls_cert", "--tls-key") if c.tls_key is None else ("tls_key", "--tls-cert")
        refuse(given, f"TLS needs {missing} too")
    if c.tls_client_ca is not None and c.tls_cert is None:
        refuse("tls_client_ca", "client certificates need TLS: give --tls-cert and --tls-key too")
    _check_worker(c)
    for dest in ("worker_timeout_s", "worker_start_timeout_s"):
        if dest in given and c.workers == 1:  # a supervisor's setting: one server has none to apply it
            refuse(dest, f"applies only with --workers 2 or more, which a supervisor watches; "
                   f"{setting('workers')} serves in one process")
    if c.workers > 1 and c.port == 0:
        refuse("workers", f"{c.workers} workers share one port, so --port must name it (not 0)")


_BY_SUPERVISOR = "set by --workers' supervisor, not by hand"


def _check_worker(c: ServerConfig) -> None:
    """The flags a supervisor gives each worker (never a user): a wrong one would size the memory share wrong
    or leave the supervisor waiting."""
    if (c.worker_index is None) != (c.ready_fd is None):
        pair = ["--worker-index", "--ready-fd"]
        given, missing = pair if c.ready_fd is None else pair[::-1]
        raise ConfigError(f"argument {given}: only with {missing} ({_BY_SUPERVISOR})")
    if c.worker_index is None or c.ready_fd is None:
        return
    if not c.worker_index < c.workers:
        raise ConfigError(f"argument --worker-index: {c.worker_index} is not below --workers {c.workers} "
                          f"({_BY_SUPERVISOR})")
    try:
        is_pipe = c.ready_fd > 2 and stat.S_ISFIFO(os.fstat(c.ready_fd).st_mode)
    except OSError:
        is_pipe = False
    if not is_pipe:
        raise ConfigError(f"argument --ready-fd: {c.ready_fd} is not an open pipe of this process ({_BY_SUPERVISOR})")
