"""Loopback ports for servers the tests and tools start (no heavy imports: the load generator uses it too)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback port free right now, for a server that must come back on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ipv6_loopback() -> bool:
    """Whether this host has an IPv6 loopback (::1) to listen on."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            return True
    except OSError:
        return False
