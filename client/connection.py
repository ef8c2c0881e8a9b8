"""Where and how to connect: one or several servers, load balancing, TLS and a bearer token."""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

DEFAULT_TARGET = "localhost:50051"
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's own limit: a full request of full-width values needs ~8 MiB
# Reconnect quickly after a server restart instead of grpc's default backoff of up to two minutes. While calls
# are open, ping the connection every 10 s and drop it when a ping (these, or grpc's own bandwidth probes) goes
# unanswered for 10 s: a server that stopped (SIGSTOP, a host gone, a black-holed link) never closes its
# connections, and a stream would wait on it forever (grpc's own ping timeout is a minute, measured 63 s). grpc
# pings at most twice without data in between, within what servers allow (ours: server.transport.options).
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 10_000, 10_000
_DEFAULT_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.max_receive_message_length", _MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
)


@dataclass(frozen=True)
class Tls:
    """TLS settings: PEM bytes; no root certificates = the system's; key + chain = mutual TLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name: str | None = None  # the name the server certificate must carry, when not the target's

    @classmethod
    def from_files(cls, ca: str | Path | None = None, cert: str | Path | None = None,
                   key: str | Path | None = None, server_name: str | None = None) -> Tls:
        def read(path: str | Path | None, what: str, marker: bytes) -> bytes | None:
            if path is None:
                return None
            pem = Path(path).read_bytes()
            if marker not in pem:  # grpc would accept it here and fail every handshake with lines of its own
                raise ValueError(f"{path} holds no PEM {what}")
            return pem

        return cls(read(ca, "certificate", b"-----BEGIN CERTIFICATE-----"),
                   read(key, "private key", b"PRIVATE KEY-----"),
                   read(cert, "certificate", b"-----BEGIN CERTIFICATE-----"), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class Connection:
    """Everything a channel needs; makes blocking and asyncio channels alike."""

    target: str
    tls: Tls | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # sent with every call (the bearer token)
    options: tuple[tuple[str, int | str], ...] = field(default=_DEFAULT_OPTIONS)

    def channel(self) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(self.target, options=list(self.options))
        return grpc.secure_channel(self.target, self.tls.credentials(), options=list(self.options))

    def aio_channel(self) -> grpc.aio.Channel:
        """Create it inside the event loop that will use it."""
        if self.tls is None:
            return grpc.aio.insecure_channel(self.target, options=list(self.options))
        return grpc.aio.secure_channel(self.target, self.tls.credentials(), options=list(self.options))


LOAD_BALANCING = ("pick_first", "round_robin")  # gRPC's built-in policies (any other fails every call)


def connect(servers: str | Sequence[str] = DEFAULT_TARGET, *, tls: Tls | bool | None = None,
            token: str | None = None, load_balancing: str | None = None,
            options: Sequence[tuple[str, int | str]] = ()) -> Connection:
    """Describe a connection to `servers`.

    `servers`: "host:port"; several, as a list or comma-separated (resolved once, here, and balanced with
    round_robin); or any gRPC target such as "dns:///embed.internal:50051", which re-resolves and is
    balanced with round_robin too. `load_balancing` overrides the policy ("pick_first", "round_robin").
    `tls=True` uses the system's root certificates. `token` goes out as "authorization: Bearer <token>"
    on every call; without TLS it travels in clear text, so keep that to loopback or a trusted network.
    """
    if token is not None:
        if not isinstance(token, str):
            raise TypeError(f"token must be a str or None, not {type(token).__name__}")
        if not token:  # sending none would hide a missing secret until the server refuses every call
            raise ValueError("the token is empty; pass None to send no token")
        if token != token.strip():  # no server token has them: every call would be refused
            raise ValueError("the token has whitespace at its start or end (a line end read with it?)")
        if not (token.isascii() and token.isprintable()):
            # An HTTP/2 header value; grpc would fail every call with INTERNAL "Invalid metadata".
            raise ValueError("the token must be printable ASCII (no line breaks or other control characters)")
    if not isinstance(tls, (Tls, bool, type(None))):
        raise TypeError(f"tls must be a Tls, True, False or None, not {type(tls).__name__}")
    if isinstance(servers, (bytes, bytearray)) or not isinstance(servers, str | Sequence):
        raise TypeError(f"servers must be a str or a sequence of str, not {type(servers).__name__}")
    given = [servers] if isinstance(servers, str) else list(servers)
    if wrong := [entry for entry in given if not isinstance(entry, str)]:
        raise TypeError(f"servers must be a str or a sequence of str; one is {type(wrong[0]).__name__}")
    if load_balancing is not None and load_balancing not in LOAD_BALANCING:
        raise ValueError(f"load_balancing must be one of {', '.join(LOAD_BALANCING)} or None, not {load_balancing!r}")
    addresses = [a.strip() for entry in given for a in entry.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    tls_settings = Tls() if tls is True else (tls or None)
    all_options = dict(_DEFAULT_OPTIONS)
    if len(addresses) == 1:
        target = addresses[0]
        balanced = target.startswith("dns:")
    else:
        target, host = _static_target(addresses)
        balanced = True
        if tls_settings is not None and host and not tls_settings.server_name:
            all_options["grpc.ssl_target_name_override"] = host  # certificates name hosts, not addresses
    if tls_settings is not None and tls_settings.server_name:
        all_options["grpc.ssl_target_name_override"] = tls_settings.server_name
    policy = load_balancing or ("round_robin" if balanced else None)
    if policy:
        all_options["grpc.service_config"] = json.dumps({"loadBalancingConfig": [{policy: {}}]})
    all_options.update(options)
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    return Connection(target, tls_settings, metadata, tuple(all_options.items()))


def _static_target(addresses: Sequence[str]) -> tuple[str, str | None]:
    """"ipv4:a:p,b:p" (or ipv6:) for several host:port addresses, and the first host name, if any."""
    ips: list[tuple[int, str, int]] = []
    first_name = None
    for address in addresses:
        if address.startswith(_SCHEMES):
            raise ValueError(f"{address!r}: several servers must be plain host:port addresses; "
                             "use a single dns:/// target for a name that resolves to several servers")
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"{address!r} is not host:port")
        try:
            ip = ipaddress.ip_address(host)
            ips.append((ip.version, str(ip), int(port)))
        except ValueError:
            first_name = first_name or host
            try:
                found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise ValueError(f"cannot resolve {host!r}: {exc.strerror}") from None
            ips += [(6 if family == socket.AF_INET6 else 4, info[0], int(port)) for family, *_, info in found]
    # grpc's static resolvers take one address family: IPv4 when there is any.
    version = 4 if any(v == 4 for v, _, _ in ips) else 6
    unique = dict.fromkeys((ip, port) for v, ip, port in ips if v == version)
    if version == 4:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in unique), first_name
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in unique), first_name
