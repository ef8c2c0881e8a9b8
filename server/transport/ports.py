"""Whether an address can be listened on, found out with sockets of our own before gRPC binds it: gRPC's own
failure is a log line of its core, outside the server's log format, and a bare port 0. No grpc here: the
supervisor of --workers checks its port too."""

from __future__ import annotations

import errno
import socket

from server.errors import StartupError

# What getaddrinfo gives per address: family, type, protocol, and the address to bind.
Address = tuple[socket.AddressFamily, socket.SocketKind, int, tuple[str, int] | tuple[str, int, int, int]]


class PortRefused(StartupError):
    """The address cannot be listened on: the message says why, in one line."""


def free_addresses(host: str, port: int, where: str) -> list[Address]:
    """Every address `host` names at `port`, as a server binds them, once a bind of our own says each is free;
    PortRefused naming `where` if not. As servers bind: connections of a server that stopped a moment ago, in
    TIME_WAIT, do not count; a socket that listens does."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortRefused(f"{where}: {exc.strerror}") from None
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise PortRefused(f"{where}: {why}") from None
    return [(family, kind, proto, address) for family, kind, proto, _, address in found]  # type: ignore[misc]
