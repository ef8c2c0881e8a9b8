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
    """The addresses `host` names at `port` that a bind of our own says are free, as gRPC would bind them: every
    one it can, refused (PortRefused naming `where`) when one is in use or none can be bound. A name may give
    an address this host cannot bind (localhost's ::1 where IPv6 is off): gRPC listens on the others. As servers
    bind: connections of a server that stopped a moment ago, in TIME_WAIT, do not count; a socket that listens
    does."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortRefused(f"{where}: {exc.strerror}") from None
    free: list[Address] = []
    failures: list[OSError] = []
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
                free.append((family, kind, proto, address))  # type: ignore[arg-type]
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortRefused(f"{where}: the port is in use") from None
                failures.append(exc)
    if not free:
        raise PortRefused(f"{where}: {failures[0].strerror}")
    return free
