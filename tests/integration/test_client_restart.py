"""A rolling restart under a running stream and a running `python -m client embed`: the only server is stopped
with SIGTERM mid-stream and a new one starts on the same port a few seconds later."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import EmbedClient, EmbeddedBatch, EmbedError
from tests.helpers.cli import feed, npy_rows, wait_for
from tools.servers import ServerProcess, free_port, running_server, spawn_server, wait_serving

ROOT = Path(__file__).resolve().parents[2]
DOWN_S = 3.0  # the port stays closed this long: reconnecting clients meet "connection refused"


def stop(server: ServerProcess) -> None:
    if server.alive():
        server.send(signal.SIGTERM)
        if server.wait(30) is None:
            server.send(signal.SIGKILL)
            server.wait(30)


def test_a_rolling_restart_loses_and_duplicates_nothing(tiny_original: Path, tmp_path: Path) -> None:
    port = free_port()
    servers = [spawn_server(str(tiny_original), tmp_path, "--grace", "5", port=port)]
    cli: subprocess.Popen[str] | None = None
    halfway, stopping, failures = threading.Event(), threading.Event(), []
    try:
        wait_serving(servers)
        target = servers[0].target
        api_texts = [f"api text {i} about {i % 7} things" for i in range(1200)]
        cli_texts = [f"cli line {i} of {i % 11} parts" for i in range(900)]
        out = tmp_path / "out.npy"
        cli = subprocess.Popen(
            [sys.executable, "-m", "client", "embed", "--target", target, "--input", "-", "--output", str(out),
             "--batch-size", "10", "--quiet"],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        feed(cli, cli_texts[:300])
        # Work is done and written before the restart: the CLI's rows of the first 300 lines reach the file.
        part = out.with_name(out.name + ".part")
        wait_for(lambda: npy_rows(part, 128) >= 200)

        batches: list[EmbeddedBatch] = []
        client = EmbedClient(target)
        stream = client.embed_stream(api_texts, "search_query", batch_size=20, window=4)

        def consume() -> None:
            try:
                for batch in stream:  # keeps pulling while the server goes down and comes back
                    batches.append(batch)
                    if len(batches) == 10:
                        halfway.set()
                        stopping.wait(60)  # the stream goes on as the server starts to drain
            except BaseException as exc:
                failures.append(exc)
            finally:
                halfway.set()

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert halfway.wait(60) and not failures
        feed(cli, cli_texts[300:600])  # in flight when the server stops
        servers[0].send(signal.SIGTERM)
        stopping.set()
        assert servers[0].wait(60) == 0
        assert len(batches) < 60  # the stream was cut mid-way
        time.sleep(DOWN_S)
        servers.append(spawn_server(str(tiny_original), tmp_path, "--grace", "5", port=port))
        wait_serving(servers[1:])
        feed(cli, cli_texts[600:])
        consumer.join(120)
        _, stderr = cli.communicate(timeout=120)  # closes stdin: the end of the input
        with client:
            want_api = client.embed(api_texts, "search_query")
            want_cli = client.embed(cli_texts)
    finally:
        stopping.set()
        if cli is not None and cli.poll() is None:
            cli.kill()
        for server in servers:
            stop(server)
    assert not failures, failures
    assert stream.stats.reopened >= 1
    assert [b.start for b in batches] == list(range(0, 1200, 20))  # each batch once, in order
    assert [t for b in batches for t in b.texts] == api_texts
    np.testing.assert_allclose(np.concatenate([b.embeddings for b in batches]), want_api, rtol=0, atol=1e-5)
    assert cli.returncode == 0, stderr
    got = np.load(out)
    assert got.shape == (900, 128)
    np.testing.assert_allclose(got, want_cli, rtol=0, atol=1e-5)


def test_a_server_that_stays_away_ends_the_stream_after_the_reconnect_timeout(tiny_original: Path) -> None:
    port = free_port()
    texts = [f"text {i}" for i in range(400)]
    batches: list[EmbeddedBatch] = []
    with EmbedClient(f"127.0.0.1:{port}") as client:
        # The whole-input timeout is a backstop: were the wait unbounded, the error would be DEADLINE_EXCEEDED.
        stream = client.embed_stream(texts, batch_size=10, window=2, reconnect_timeout=1.0, timeout=60)
        with running_server(str(tiny_original), port=port, grace_s=0.2):
            batches.append(next(stream))
        with pytest.raises(EmbedError) as info:
            batches.extend(stream)
    assert len(batches) < 40
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert "no server answered the stream for 1s" in info.value.details


def test_a_stream_that_never_had_an_answer_fails_fast(tiny_original: Path) -> None:
    # Nothing listens here: a wrong address gets RetryPolicy.max_attempts tries, not the reconnect wait.
    with EmbedClient(f"127.0.0.1:{free_port()}") as client, pytest.raises(EmbedError) as info:
        list(client.embed_stream(["a text"], reconnect_timeout=60, timeout=30))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert "the stream failed" in info.value.details


def test_a_server_that_stops_answering_ends_the_stream_instead_of_hanging(tiny_original: Path,
                                                                         tmp_path: Path) -> None:
    """A stopped server (SIGSTOP, as a host that froze or a link that drops every packet) keeps its connections
    open and answers nothing: the client's keepalive pings go unanswered, the connection is dropped, and the
    stream ends after the reconnect timeout, where it had waited forever. No whole-input timeout is set."""
    server = spawn_server(str(tiny_original), tmp_path, port=free_port())
    ended = threading.Event()
    outcome: list[BaseException] = []
    try:
        wait_serving([server])
        client = EmbedClient(server.target)
        stream = iter(client.embed_stream([f"text {i}" for i in range(4000)], batch_size=5, window=2,
                                          reconnect_timeout=1.0))
        next(stream)
        server.send(signal.SIGSTOP)

        def consume() -> None:
            try:
                for _ in stream:
                    pass
            except BaseException as error:  # the test looks at it
                outcome.append(error)
            ended.set()

        threading.Thread(target=consume, daemon=True).start()
        # Keepalive: a ping every 10 s, the connection dropped after 10 s unanswered, then 1 s of reconnecting;
        # without it grpc drops it only when its own probe's minute is up.
        assert ended.wait(45), "the stream still waits on a server that answers nothing"
        client.close()
    finally:
        server.send(signal.SIGCONT)
        stop(server)
    (error,) = outcome
    assert isinstance(error, EmbedError) and error.code is grpc.StatusCode.UNAVAILABLE, error
    assert "no server answered the stream for 1s" in error.details


def test_a_server_gone_under_several_streams_is_one_clear_error(tiny_original: Path, tmp_path: Path) -> None:
    """Every lane fails when the only server goes: the first failure is the run's, and the others are quietly
    taken (no asyncio "Task exception was never retrieved" traceback under the CLI's one-line error)."""
    server = spawn_server(str(tiny_original), tmp_path, port=free_port())
    try:
        wait_serving([server])
        source = tmp_path / "in.txt"
        source.write_text("".join(f"text number {i}\n" for i in range(30_000)))
        out = tmp_path / "out.npy"
        cli = subprocess.Popen(
            [sys.executable, "-m", "client", "embed", "--target", server.target, "--input", str(source),
             "--output", str(out), "--streams", "2", "--batch-size", "8", "--reconnect-timeout", "1", "--quiet"],
            stderr=subprocess.PIPE, text=True, cwd=ROOT)
        wait_for(lambda: npy_rows(out.with_name("out.npy.part"), 128) >= 200)
        server.send(signal.SIGKILL)
        _, stderr = cli.communicate(timeout=120)
    finally:
        stop(server)
    assert cli.returncode == 1 and "no server answered the stream for 1s" in stderr, stderr
    assert "Traceback" not in stderr and "never retrieved" not in stderr, stderr
