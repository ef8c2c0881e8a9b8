"""The listen check before gRPC binds: refused as gRPC would refuse, and nothing gRPC would serve."""

from __future__ import annotations

import socket

import pytest

from server.transport.ports import PortRefused, free_addresses

WHERE = "cannot listen on localhost:P (--port)"


def _resolving_to(monkeypatch: pytest.MonkeyPatch, *hosts: str) -> None:
    """`localhost` as a host file may give it: an address of this host, and one it does not have (as ::1
    where IPv6 is off)."""
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: [
        entry for h in hosts for entry in real(h, port, *a, **k)])


def test_an_address_the_host_cannot_bind_is_left_to_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving_to(monkeypatch, "127.0.0.1", "2001:db8::1")
    assert [a[3][0] for a in free_addresses("localhost", 0, WHERE)] == ["127.0.0.1"]


def test_no_address_that_can_be_bound_is_refused_saying_why(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolving_to(monkeypatch, "2001:db8::1")
    with pytest.raises(PortRefused, match=r"^cannot listen on localhost:P \(--port\): Cannot assign requested"):
        free_addresses("localhost", 0, WHERE)


def test_a_port_in_use_on_any_address_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _resolving_to(monkeypatch, "2001:db8::1", "127.0.0.1")
        with pytest.raises(PortRefused, match=r"\(--port\): the port is in use$"):
            free_addresses("localhost", port, WHERE)


def test_a_host_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(PortRefused, match=r"^cannot listen on localhost:P \(--port\): "):
        free_addresses("no-such-host.invalid", 0, WHERE)
