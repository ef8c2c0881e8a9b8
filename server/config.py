"""Server configuration: one frozen object, built once from argv and the environment."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from server.logs import FORMATS, LEVELS

DEFAULT_MODEL = "nomic-ai/nomic-embed-text-v1.5"
DEFAULT_PORT = 50051

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class ServerConfig:
    model: str = DEFAULT_MODEL
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    variant: str = "auto"
    device: str = "auto"
    max_memory_bytes: int | None = None
    # Tokens per text; 0 = what the model supports (8192 for nomic-embed-text-v1.5).
    max_input_tokens: int = 0
    max_texts_per_request: int = 2048
    max_text_chars: int = 1_000_000
    max_batch_tokens: int = 16384
    max_batch_rows: int = 128
    max_queue_tokens: int = 1_000_000
    max_request_tokens: int = 262_144
    max_request_bytes: int = 16 * 2**20
    batch_wait_ms: float = 0.0
    threads: int = 0  # intra-op threads of the model; 0 = the cores this process may use
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
    # OTLP/gRPC collector for traces (http://host:4317); None = no tracing, and OpenTelemetry stays unloaded.
    otlp_endpoint: str | None = None


def parse_size(text: str) -> int:
    """'1.5GiB' -> 1610612736; plain numbers are bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 800MiB, 1.5GiB, 2GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m server", description="Serve text embeddings over gRPC.")
    d = ServerConfig()
    p.add_argument("--model", default=d.model, help="hub id or local directory in the hub layout")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port")
    p.add_argument("--variant", default=d.variant, help="auto, or a variant name (see quant.variants)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-memory", type=parse_size, default=None, dest="max_memory_bytes",
                   help="cap on weights + workspace, e.g. 1.5GiB")
    p.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens)
    p.add_argument("--max-texts-per-request", type=int, default=d.max_texts_per_request)
    p.add_argument("--max-text-chars", type=int, default=d.max_text_chars)
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens,
                   help="padded tokens (rows x longest row) per model batch")
    p.add_argument("--max-batch-rows", type=int, default=d.max_batch_rows)
    p.add_argument("--max-request-tokens", type=int, default=d.max_request_tokens,
                   help="tokens per request, all texts together (beyond it: INVALID_ARGUMENT)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                   help="serialized bytes per request (beyond it: INVALID_ARGUMENT)")
    p.add_argument("--max-queue-tokens", type=int, default=d.max_queue_tokens,
                   help="tokens admitted but not yet computed; beyond it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="how long an idle worker waits to fill a batch")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--rotary-scaling-factor", type=float, default=d.rotary_scaling_factor,
                   help="dynamic NTK factor for inputs beyond the trained positions; 0 disables")
    p.add_argument("--grace", type=float, default=d.grace_s, dest="grace_s",
                   help="seconds admitted work may take to finish on shutdown")
    p.add_argument("--max-connection-age", type=float, default=d.max_connection_age_s, dest="max_connection_age_s",
                   help="seconds before the server asks a client to reconnect (rebalancing over replicas); 0 = never")
    p.add_argument("--max-connection-age-grace", type=float, default=d.max_connection_age_grace_s,
                   dest="max_connection_age_grace_s", help="seconds calls in flight on an aged connection may take")
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=d.log_level)
    p.add_argument("--log-format", choices=FORMATS, default=d.log_format,
                   help="json: one JSON object per line, with the request id of the call that wrote it")
    p.add_argument("--access-log", action="store_true", default=d.access_log,
                   help="log one line per RPC: method, status code, duration, request id (never texts)")
    p.add_argument("--otlp-endpoint", default=None,
                   help="send OpenTelemetry traces over OTLP/gRPC, e.g. http://collector:4317 (needs the "
                        "[tracing] extra); default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics over HTTP on this port (on --host); off by default")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA bundle; requires client certificates (mTLS)")
    p.add_argument("--auth-token-file", default=None,
                   help="file of bearer tokens, one per line; calls need 'authorization: Bearer <token>' "
                        "(health checks stay open). NOMIC_EMBED_AUTH_TOKENS adds comma-separated tokens")
    return p


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config from argv; NOMIC_EMBED_<FLAG> environment variables supply defaults."""
    env = os.environ if env is None else env
    parser = _parser()
    defaults = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        key = "NOMIC_EMBED_" + action.option_strings[0].lstrip("-").replace("-", "_").upper()
        if key in env:
            value = env[key]
            if isinstance(action, argparse._StoreTrueAction):
                defaults[action.dest] = value.strip().lower() in ("1", "true", "yes", "on")
            else:
                defaults[action.dest] = action.type(value) if action.type else value
    defaults.setdefault("otlp_endpoint", _otel_endpoint(env))
    parser.set_defaults(**defaults)
    args = parser.parse_args(list(argv))
    config = ServerConfig(**vars(args), auth_tokens_env=env.get("NOMIC_EMBED_AUTH_TOKENS") or None)
    _check(config, parser)
    return config


def _otel_endpoint(env: Mapping[str, str]) -> str | None:
    """The standard OpenTelemetry variables, unless OTEL_SDK_DISABLED=true."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def _check(config: ServerConfig, parser: argparse.ArgumentParser) -> None:
    positive = ("max_texts_per_request", "max_text_chars", "max_batch_tokens", "max_batch_rows",
                "max_queue_tokens", "max_request_tokens", "max_request_bytes")
    for name in positive:
        if getattr(config, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if config.max_input_tokens < 0 or config.threads < 0 or config.batch_wait_ms < 0:
        parser.error("--max-input-tokens, --threads and --batch-wait-ms must not be negative")
    if config.max_connection_age_s < 0 or config.max_connection_age_grace_s < 0:
        parser.error("--max-connection-age and --max-connection-age-grace must not be negative")
    if not 0 <= config.port <= 65535:
        parser.error("--port must be 0..65535")
