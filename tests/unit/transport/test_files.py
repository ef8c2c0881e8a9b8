"""The files start-up flags name are read whole, or refused in one line without waiting on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.errors import StartupError
from server.transport.files import MAX_BYTES, read_file


def test_a_regular_file_is_read_through_a_link(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_bytes(b"first\nsecond\n")
    (tmp_path / "link").symlink_to(tmp_path / "tokens")  # as Kubernetes mounts a secret
    assert read_file(str(tmp_path / "link"), "token file", "--auth-token-file") == b"first\nsecond\n"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(StartupError, match=r"^the token file .*fifo \(--auth-token-file\) is not a regular file$"):
        read_file(str(fifo), "token file", "--auth-token-file")


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "/"])
def test_devices_and_folders_are_refused(path: str) -> None:
    with pytest.raises(StartupError, match=rf"^the TLS key {path} \(--tls-key\) is not a regular file$"):
        read_file(path, "TLS key", "--tls-key")


def test_a_file_over_the_limit_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (MAX_BYTES + 1))
    with pytest.raises(StartupError, match=r"\(--tls-cert\) is larger than 1 MiB: is it the right file\?$"):
        read_file(str(big), "TLS certificate", "--tls-cert")
    big.write_bytes(b"x" * MAX_BYTES)
    assert len(read_file(str(big), "TLS certificate", "--tls-cert")) == MAX_BYTES


def test_a_missing_file_says_why(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"^cannot read the client CA .* \(--tls-client-ca\): No such file"):
        read_file(str(tmp_path / "none.pem"), "client CA", "--tls-client-ca")
