"""embed_stream against a real server on loopback: order, equality with unary calls, restarts, cancellation."""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import AsyncEmbedClient, EmbedClient, EmbedError
from tools.servers import RunningServer, free_port, running_server

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


def short_texts(n: int) -> list[str]:
    return [f"{i} {WORDS[i % 10]} {WORDS[i // 10 % 10]}" for i in range(n)]


def unary(client: EmbedClient, texts: list[str], task: str = "search_query", **kwargs: object) -> np.ndarray:
    return np.concatenate([client.embed(texts[i : i + 2000], task, **kwargs)  # type: ignore[arg-type]
                           for i in range(0, len(texts), 2000)])


def server_tasks(srv: RunningServer) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), srv.loop).result(timeout=10)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def test_ten_thousand_texts_come_back_in_order_equal_to_unary(tiny_server: RunningServer) -> None:
    texts = short_texts(10_000)
    sample = slice(3, None, 10)  # every tenth text, from every batch, keeps the test quick
    with tiny_server.client() as client:
        stream = client.embed_stream(texts, "search_query", batch_size=50, window=2)
        batches = list(stream)
        want = unary(client, texts[sample])
    assert [b.start for b in batches] == list(range(0, 10_000, 50))
    assert [t for b in batches for t in b.texts] == texts
    got = np.concatenate([b.embeddings for b in batches])
    assert got.shape == (10_000, 128)
    np.testing.assert_allclose(got[sample], want, rtol=0, atol=1e-5)
    assert stream.stats.sent == 200 and stream.stats.retried == stream.stats.reopened == 0
    assert all(t > 0 for b in batches for t in b.tokens)


def test_several_streams_and_packed_encodings_keep_the_order(tiny_server: RunningServer) -> None:
    texts = short_texts(300)
    with tiny_server.client() as client:
        for encoding in ("int8", "ubinary", "float16"):
            got = np.concatenate([b.embeddings for b in client.embed_stream(
                texts, "clustering", 64, encoding=encoding, batch_size=16, window=5, streams=3)])
            want = unary(client, texts, "clustering", dimensions=64, encoding=encoding)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.abs(got.astype(np.float32) - want.astype(np.float32)).max() <= (1 if encoding == "int8" else 1e-3)


@pytest.mark.parametrize("max_texts", [2048, 6])  # 6: every batch of 20 is halved, parts in flight at the restart
def test_a_server_restart_mid_stream_loses_and_duplicates_nothing(tiny_original: Path, max_texts: int) -> None:
    port = free_port()
    up, restart, finished = threading.Event(), threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def serve_then_restart() -> None:
        try:
            with running_server(str(tiny_original), port=port, grace_s=0.2, max_texts_per_request=max_texts):
                up.set()
                restart.wait(60)
            with running_server(str(tiny_original), port=port, grace_s=0.2, max_texts_per_request=max_texts):
                finished.wait(60)
        except BaseException as exc:
            failures.append(exc)
            up.set()

    servers = threading.Thread(target=serve_then_restart)
    servers.start()
    try:
        assert up.wait(60) and not failures
        texts = short_texts(2000)
        with EmbedClient(f"127.0.0.1:{port}") as client:
            stream = client.embed_stream(texts, "search_query", batch_size=20, window=4)
            batches = []
            for batch in stream:  # keeps pulling while the server goes down and comes back
                batches.append(batch)
                if len(batches) == 30:
                    restart.set()
            want = np.concatenate([client.embed(texts[i : i + 5], "search_query") for i in range(0, 2000, 5)])
    finally:
        restart.set()
        finished.set()
        servers.join(60)
    assert not failures
    assert stream.stats.reopened >= 1
    assert stream.stats.sent > len(batches)  # what the broken stream left unanswered went out again
    assert [b.start for b in batches] == list(range(0, 2000, 20))
    np.testing.assert_allclose(np.concatenate([b.embeddings for b in batches]), want, rtol=0, atol=1e-5)


def test_closing_mid_stream_frees_the_stream_and_stops_reading_input(tiny_server: RunningServer) -> None:
    threads_before = set(threading.enumerate())
    tasks_before = server_tasks(tiny_server)
    pulled = 0

    def endless() -> Iterator[str]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield f"text number {i}"

    client = tiny_server.client()
    stream = client.embed_stream(endless(), batch_size=10, window=3)
    for _ in range(5):
        next(stream)
    assert server_tasks(tiny_server) > tasks_before  # the stream is being served
    stream.close()
    assert eventually(lambda: server_tasks(tiny_server) == tasks_before)
    # Backpressure: input is read only as far as the window allows (5 handed out, 3 in flight, one batch
    # formed and waiting for room, one text read ahead to close it).
    assert pulled <= (5 + 3 + 1) * 10 + 1
    with pytest.raises(StopIteration):
        next(stream)
    client.close()
    assert eventually(lambda: set(threading.enumerate()) <= threads_before)


def test_the_overall_deadline_ends_the_stream(tiny_server: RunningServer) -> None:
    tasks_before = server_tasks(tiny_server)
    started = time.monotonic()
    with tiny_server.client() as client, pytest.raises(EmbedError) as info:
        for _ in client.embed_stream((f"text {i}" for i in itertools.count()), batch_size=10, timeout=0.5):
            pass
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert eventually(lambda: server_tasks(tiny_server) == tasks_before)


def test_a_bad_text_fails_in_order_naming_its_index_in_the_whole_input(tiny_server: RunningServer) -> None:
    texts = short_texts(300)
    texts[123] = "   "
    starts = []
    with tiny_server.client() as client, pytest.raises(EmbedError) as info:
        for batch in client.embed_stream(texts, batch_size=50, window=4):
            starts.append(batch.start)
    assert starts == [0, 50]
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.field == "texts[123]" and "texts[123]" in info.value.details


def test_async_client_streams_an_async_source_and_stops_early(tiny_server: RunningServer) -> None:
    texts = short_texts(300)

    async def source() -> Iterator[str]:  # type: ignore[misc]
        for text in texts:
            yield text

    async def run() -> tuple[list[np.ndarray], np.ndarray, list[int]]:
        async with AsyncEmbedClient(tiny_server.target) as client:
            got = [b.embeddings async for b in client.embed_stream(source(), "search_query", batch_size=32)]
            want = await client.embed(texts, "search_query")
            early = []
            async with client.embed_stream(source(), batch_size=10, window=2) as stream:
                async for batch in stream:
                    early.append(batch.start)
                    if len(early) == 2:
                        break
            return got, want, early

    got, want, early = asyncio.run(run())
    np.testing.assert_allclose(np.concatenate(got), want, rtol=0, atol=1e-5)
    assert early == [0, 10]


def test_a_stream_halves_batches_a_server_refuses_as_too_large(tiny_original: Path) -> None:
    # The client's batches (64 texts, ~8192 estimated tokens) are far above this server's limits; a refused batch
    # is sent again as halves, and the caller still gets each batch whole, in order.
    long = " ".join(WORDS * 4)  # ~42 tokens: two of them exceed 64 tokens per request
    texts = [*short_texts(20), long, long + " kilo", long + " lima", *short_texts(9)]
    with running_server(str(tiny_original), max_texts_per_request=7, max_input_tokens=64,
                        max_request_tokens=64) as srv, srv.client() as client:
        expected = np.concatenate([client.embed([text], "search_query") for text in texts])
        stream = client.embed_stream(texts, "search_query", batch_size=16)
        batches = list(stream)
        assert [(b.start, len(b.texts)) for b in batches] == [(0, 16), (16, 16)]
        np.testing.assert_allclose(np.concatenate([b.embeddings for b in batches]), expected, atol=1e-6)
        assert [t for b in batches for t in b.texts] == texts and stream.stats.split >= 6
        with pytest.raises(EmbedError) as refused:
            list(client.embed_stream([*texts[:13], "   ", *texts[14:]], "search_query"))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT and refused.value.field == "texts[13]"


def test_an_error_in_one_part_of_a_halved_batch_ends_the_stream_there(tiny_original: Path) -> None:
    # Batches of 7 against 3 per request: batch 2 (texts 14-20) is halved into 14-16, whose blank text fails it,
    # and 17-20, itself refused and halved. Its answers came after the batch had ended and were taken for it:
    # texts 14-16 were dropped without an error, and the stream hung.
    texts = short_texts(42)
    texts[15] = "   "
    with running_server(str(tiny_original), max_texts_per_request=3) as srv, srv.client() as client:
        expected = np.concatenate([client.embed(texts[i : i + 2], "search_query") for i in range(0, 14, 2)])
        stream = iter(client.embed_stream(texts, "search_query", batch_size=7, window=4, timeout=60))
        first = next(stream)
        time.sleep(0.5)  # a consumer a little slower than the answers
        second = next(stream)
        with pytest.raises(EmbedError) as refused:
            next(stream)
    np.testing.assert_allclose(np.concatenate([first.embeddings, second.embeddings]), expected, atol=1e-6)
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT and refused.value.field == "texts[15]"


def test_a_text_over_a_per_request_limit_alone_is_named(tiny_original: Path) -> None:
    # In windows averaged (mean mode) one long text reads more tokens than a request may: halving ends at it.
    texts = ["a short text", "another short text", " ".join(WORDS * 10), "a last short text"]
    with running_server(str(tiny_original), max_input_tokens=16, max_request_tokens=32) as srv, \
            srv.client() as client, pytest.raises(EmbedError) as refused:
        list(client.embed_stream(texts, "search_query", long_text_mode="mean"))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT and refused.value.field == "texts[2]"
    assert refused.value.details == ("texts[2]: 192 tokens exceed the limit of 32 tokens per request, with this "
                                     "text alone")
    lines = io.StringIO("".join(f"{text}\n\n" for text in texts))  # a file: blank lines between texts
    with running_server(str(tiny_original), max_input_tokens=16, max_request_tokens=32) as srv, \
            srv.client() as client, pytest.raises(EmbedError) as refused:
        list(client.embed_stream(lines, "search_query", long_text_mode="mean"))
    assert refused.value.details.startswith("texts[2] (line 5): 192 tokens exceed the limit")
