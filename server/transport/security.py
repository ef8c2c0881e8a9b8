"""Transport security: TLS / mTLS credentials and bearer-token authentication."""

from __future__ import annotations

import datetime
import hmac
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
from cryptography import x509

from server.errors import StartupError
from server.transport.files import read_file

log = logging.getLogger(__name__)

# Load balancers and orchestrators probe health without credentials.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


def server_credentials(cert: str | None, key: str | None, client_ca: str | None) -> grpc.ServerCredentials | None:
    """TLS when a certificate and key are given; mTLS (client certificates required) with a client CA.
    The files are checked here, before anything binds: grpc itself would only fail to bind the port."""
    if not cert and not key:
        if client_ca:
            raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise StartupError("TLS needs both --tls-cert and --tls-key")
    pair = (read_file(key, "TLS key", "--tls-key"), read_file(cert, "TLS certificate", "--tls-cert"))
    root = read_file(client_ca, "client CA", "--tls-client-ca") if client_ca else None
    _check_certificates(pair[1], f"the TLS certificate {cert} (--tls-cert)")
    _check_pair(cert, key)
    # The server's own certificate, the first of its chain (the others are its issuers).
    _check_dates(_certificates(pair[1])[:1], f"the TLS certificate {cert} (--tls-cert)", "every client would refuse it")
    if root is not None:
        _check_certificates(root, f"the client CA {client_ca} (--tls-client-ca)")
        _check_client_ca(root, f"the client CA {client_ca} (--tls-client-ca)")
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


def _check_certificates(pem: bytes, what: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError):
        raise StartupError(f"{what} holds no PEM certificate") from None


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:  # what ssl accepts and cryptography does not: leave it to the handshake
        return []


def _check_dates(certs: list[x509.Certificate], what: str, consequence: str) -> None:
    """Refuse certificates all outside their validity period now."""
    now = datetime.datetime.now(datetime.UTC)
    valid = [c for c in certs if c.not_valid_before_utc <= now <= c.not_valid_after_utc]
    if certs and not valid:
        c = certs[0]
        when = (f"expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC" if c.not_valid_after_utc < now
                else f"is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        raise StartupError(f"{what} {when}: {consequence}")


def _check_client_ca(pem: bytes, what: str) -> None:
    certs = _certificates(pem)
    _check_dates(certs, what, "no client certificate would be accepted")
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            log.warning("%s holds %s, which is not a CA certificate (no basicConstraints CA:TRUE): a client is "
                        "accepted only with that very certificate, not with one it issued", what,
                        cert.subject.rfc4514_string())


def _check_pair(cert: str, key: str) -> None:
    """The key must be an unencrypted PEM key that belongs to the certificate's public key."""
    asked: list[bool] = []

    def password() -> bytes:  # called only for an encrypted key; grpc has no way to decrypt one
        asked.append(True)
        return b""

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=password)
    except ssl.SSLError as exc:
        if asked:
            problem = "is encrypted; give an unencrypted PEM key"
        elif exc.reason == "KEY_VALUES_MISMATCH":
            problem = f"does not belong to the TLS certificate {cert} (--tls-cert)"
        else:
            problem = "holds no PEM private key"
        raise StartupError(f"the TLS key {key} (--tls-key) {problem}") from None
    except OSError as exc:
        raise StartupError(f"cannot read the TLS key {key} or certificate {cert}: {exc.strerror}") from None


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
