"""Transport security: TLS / mTLS credentials and bearer-token authentication."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import grpc

from server.errors import StartupError

log = logging.getLogger(__name__)

# Load balancers and orchestrators probe health without credentials.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def server_credentials(cert: str | None, key: str | None, client_ca: str | None) -> grpc.ServerCredentials | None:
    """TLS when a certificate and key are given; mTLS (client certificates required) with a client CA."""
    if not cert and not key:
        if client_ca:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    root = _read(client_ca, "client CA") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def load_tokens(token_file: str | None, env_tokens: str | None) -> list[bytes]:
    """Tokens from a file (one per line, # comments) and/or a comma-separated environment value."""
    tokens: list[str] = []
    if token_file:
        lines = _read(token_file, "token file").decode().splitlines()
        tokens += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not tokens:
            raise StartupError(f"the token file {token_file} holds no token")
    if env_tokens:
        tokens += [t.strip() for t in env_tokens.split(",") if t.strip()]
    return [t.encode() for t in tokens]


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except the open (health) methods."""

    def __init__(self, tokens: Sequence[bytes], open_methods: Iterable[str] = OPEN_METHODS) -> None:
        if not tokens:
            raise ValueError("at least one token is required")
        self._tokens = list(tokens)
        self._open = frozenset(open_methods)

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                raw = value if isinstance(value, bytes) else value.encode()
                if raw[:7].lower() == b"bearer ":
                    presented = raw[7:].strip()
        # Compare against every token, always: the time taken says nothing about which one nearly matched.
        matches = [hmac.compare_digest(presented, token) for token in self._tokens]
        return bool(presented) and any(matches)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method in self._open or handler is None or self._authorized(details.invocation_metadata):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid 'authorization: Bearer <token>' is required")

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
