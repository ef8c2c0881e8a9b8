"""What callers hand the client, against a real server on loopback: one str, closed clients, bad numbers, files."""

from __future__ import annotations

import array
import asyncio
import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import AsyncEmbedClient, EmbedClient, EmbedError
from client.retry import RetryPolicy
from tools.servers import RunningServer


def test_a_bare_str_is_one_text(tiny_server: RunningServer) -> None:
    with tiny_server.client() as client:
        one = client.embed("hello", "search_query")
        listed = client.embed(["hello"], "search_query")
        assert one.shape == (128,)
        np.testing.assert_array_equal(one, listed[0])
        assert len(client.embed_response("hello").embeddings) == 1
        assert client.tokenize("hello") == client.tokenize(["hello"])[0]

    async def run() -> tuple[np.ndarray, list[int]]:
        async with AsyncEmbedClient(tiny_server.target) as client:
            return await client.embed("hello", "search_query"), await client.tokenize("hello")

    vector, ids = asyncio.run(run())
    np.testing.assert_array_equal(vector, listed[0])
    assert isinstance(ids[0], int)


def test_a_text_that_is_not_a_str_is_named() -> None:
    with EmbedClient("127.0.0.1:1") as client, pytest.raises(TypeError, match=r"texts\[1\] is a bytes, not a str"):
        client.embed(["a", b"b"])  # type: ignore[list-item]


class _KeysOnly:
    """A mapping that is not registered as one: dict() and ** take it by its keys()."""

    def __init__(self, items: dict[str, int]) -> None:
        self._items = items

    def keys(self) -> list[str]:
        return list(self._items)

    def __getitem__(self, key: str) -> int:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


class _TableLike:
    """What a pandas DataFrame is to iteration (its documented behaviour): ndim 2, keys() and __iter__ give
    the column labels, not the rows."""

    ndim = 2

    def __init__(self, columns: list[str]) -> None:
        self.columns = columns

    def keys(self) -> list[str]:
        return self.columns

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)


class _ColumnLike:
    """What a pandas Series is to iteration: ndim 1, __iter__ gives the values, keys() the index."""

    ndim = 1

    def __init__(self, values: list[str]) -> None:
        self._values = values

    def keys(self) -> range:
        return range(len(self._values))

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def test_one_column_of_a_table_is_embedded_as_its_values(tiny_server: RunningServer) -> None:
    with tiny_server.client() as client:
        np.testing.assert_array_equal(client.embed(_ColumnLike(["a", "b"])),  # type: ignore[arg-type]
                                      client.embed(["a", "b"]))


@pytest.mark.parametrize(("texts", "kind", "message"), [
    ({"b", "a"}, TypeError, r"^texts must be a sequence or an iterator of str, not a set: vectors come back in input"),
    ({"a": 1}, TypeError, r"^texts must be a sequence or an iterator of str, not a dict"),
    (frozenset({"a"}), TypeError, r"not a frozenset"),
    ([], ValueError, r"^texts is empty: at least one text is required$"),
    (_KeysOnly({"a": 1}), TypeError, r"^texts must be a sequence or an iterator of str, not a _KeysOnly: vectors"),
    (_TableLike(["text", "id"]), TypeError, r"^texts must be one-dimensional, not a _TableLike of 2 dimensions \(a "
                                            r"table iterates its column names or its rows\); pass one column"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, r"^texts must be one-dimensional, not a ndarray of 2 dim"),
    (array.array("u", "ab"), TypeError, r"^texts must be a sequence or an iterator of str, not an array.array: "
                                        r"it iterates characters"),
])
def test_texts_without_an_order_or_without_texts_are_refused_before_sending(texts: object, kind: type[Exception],
                                                                           message: str) -> None:
    with EmbedClient("127.0.0.1:1", retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(kind, match=message):
            client.embed(texts)  # type: ignore[arg-type]
        with pytest.raises(kind, match=message):
            client.tokenize(texts)  # type: ignore[arg-type]
        if not isinstance(texts, list):  # [] is a stream with no batches, as an empty file is
            with pytest.raises(kind, match=message):
                client.embed_stream(texts)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "kind", "message"), [
    ({"tls": "yes"}, TypeError, r"^tls must be a Tls, True, False or None, not str$"),
    ({"token": ""}, ValueError, r"^the token is empty; pass None to send no token$"),
    ({"token": "s3cret\n"}, ValueError, r"^the token has whitespace at its start or end \(a line end read with it"),
    ({"token": " "}, ValueError, r"^the token has whitespace at its start or end"),
    ({"token": b"s3cret"}, TypeError, r"^token must be a str or None, not bytes$"),
    ({"load_balancing": "fastest"}, ValueError, r"^load_balancing must be one of pick_first, round_robin or None, "
                                                r"not 'fastest'$"),
])
def test_bad_connection_settings_are_refused_when_the_client_is_made(kwargs: dict[str, object], kind: type[Exception],
                                                                     message: str) -> None:
    with pytest.raises(kind, match=message):
        EmbedClient("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(kind, match=message):
        AsyncEmbedClient("127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("servers", "message"), [
    (None, r"^servers must be a str or a sequence of str, not NoneType$"),
    (5, r"^servers must be a str or a sequence of str, not int$"),
    (b"127.0.0.1:1", r"^servers must be a str or a sequence of str, not bytes$"),
    (["127.0.0.1:1", 5], r"^servers must be a str or a sequence of str; one is int$"),
])
def test_servers_that_are_not_addresses_are_refused_naming_the_argument(servers: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        EmbedClient(servers)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=message):
        AsyncEmbedClient(servers)  # type: ignore[arg-type]


def test_an_async_client_follows_its_event_loop(tiny_server: RunningServer) -> None:
    client = AsyncEmbedClient(tiny_server.target)  # made outside any loop, as at a module's top level

    async def embed() -> np.ndarray:
        return await client.embed("hello")

    first = asyncio.run(embed())
    second = asyncio.run(embed())  # a new loop: the first one's channel died with it
    np.testing.assert_array_equal(first, second)

    async def from_a_second_loop_while_the_first_runs() -> str:
        await client.embed("hello")
        errors: list[BaseException] = []
        worker = threading.Thread(target=lambda: errors.append(_raised(lambda: asyncio.run(embed()))))
        worker.start()
        await asyncio.to_thread(worker.join)
        await client.close()
        return str(errors[0])

    assert asyncio.run(from_a_second_loop_while_the_first_runs()) == (
        "this AsyncEmbedClient serves another event loop, which is still running; create one client per event loop")
    with pytest.raises(RuntimeError, match=r"^AsyncEmbedClient works inside a running event loop"):
        AsyncEmbedClient(tiny_server.target).embed_stream(["a"])


MANY = [f"text number {i} of a stream long enough to be open when its client closes" for i in range(4000)]


def test_closing_an_async_client_ends_its_open_streams_with_cancelled(tiny_server: RunningServer) -> None:
    # The stream's waiter hung for good: the lanes ended cancelled, which counted as no failure.
    async def close_mid_stream() -> EmbedError:
        client = AsyncEmbedClient(tiny_server.target)
        stream = client.embed_stream(MANY, batch_size=4)
        await stream.__anext__()
        await client.close()
        with pytest.raises(EmbedError) as info:
            for _ in range(10):  # the batches already answered (a window of 4) are still handed out
                await asyncio.wait_for(stream.__anext__(), 30)
        return info.value

    error = asyncio.run(close_mid_stream())
    assert error.code is grpc.StatusCode.CANCELLED
    assert error.details == "the client was closed while this stream was open"


def test_an_async_client_closed_from_another_loop_closes_its_channel_on_its_own(tiny_server: RunningServer) -> None:
    client = AsyncEmbedClient(tiny_server.target)
    first_batch, closed, outcome = threading.Event(), threading.Event(), []

    async def stream_until_closed() -> None:
        stream = client.embed_stream(MANY, batch_size=4)
        await stream.__anext__()
        first_batch.set()
        await asyncio.to_thread(closed.wait)
        try:
            for _ in range(10):  # the batches already answered (a window of 4) are still handed out
                await asyncio.wait_for(stream.__anext__(), 30)
        except EmbedError as exc:
            outcome.append(exc.code)

    worker = threading.Thread(target=lambda: asyncio.run(stream_until_closed()))
    worker.start()
    assert first_batch.wait(60)
    asyncio.run(client.close())  # another loop, while the channel's runs
    closed.set()
    worker.join(60)
    assert outcome == [grpc.StatusCode.CANCELLED]


def test_a_stream_iterated_in_another_loop_than_its_channels_is_refused(tiny_server: RunningServer) -> None:
    client = AsyncEmbedClient(tiny_server.target)

    async def make() -> object:
        return client.embed_stream(["a", "b"])

    async def iterate(stream: object) -> None:
        async for _ in stream:  # type: ignore[attr-defined]
            pass

    stream = asyncio.run(make())
    with pytest.raises(RuntimeError, match=r"^this stream is iterated in another event loop than its client's"):
        asyncio.run(iterate(stream))


def test_closing_a_blocking_client_from_another_thread_ends_its_stream_with_cancelled(
        tiny_server: RunningServer) -> None:
    client = tiny_server.client()
    stream = client.embed_stream(MANY, batch_size=4)
    next(stream)
    threading.Timer(0.2, client.close).start()
    with pytest.raises(EmbedError) as info:
        for _ in stream:
            pass
    assert info.value.code is grpc.StatusCode.CANCELLED
    assert info.value.details == "the client was closed while this stream was open"


def test_first_streams_from_several_threads_share_one_loop(tiny_server: RunningServer) -> None:
    # Each thread's first embed_stream made a loop of its own: streams on one loop's channel in another's.
    client = tiny_server.client()
    texts = MANY[:40]
    results: list[object] = []
    barrier = threading.Barrier(3)

    def stream() -> None:
        barrier.wait()
        try:
            results.append(np.concatenate([b.embeddings for b in client.embed_stream(texts, batch_size=8)]))
        except BaseException as exc:  # handed back to the test's thread
            results.append(exc)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    loops = [t for t in threading.enumerate() if t.name == "embed-client-loop"]
    client.close()
    assert len(loops) == 1
    assert all(isinstance(r, np.ndarray) for r in results), results
    expected = _unary_vectors(tiny_server, texts)
    for vectors in results:  # batches of other sizes round alike to within the fp32 bound Info states
        np.testing.assert_allclose(vectors, expected, atol=1e-6)  # type: ignore[arg-type]
    assert not [t for t in threading.enumerate() if t.name == "embed-client-loop"]


def _unary_vectors(server: RunningServer, texts: list[str]) -> np.ndarray:
    with server.client() as other:
        return other.embed(texts)


@pytest.mark.parametrize(("texts", "message"), [
    (None, "^texts must be a str or a sequence of str, not a NoneType$"),
    (7, "^texts must be a str or a sequence of str, not an int$"),
    (np.array("one"), "^texts must be a str or a sequence of str, not a ndarray$"),
])
def test_texts_that_are_not_a_collection_are_named(texts: object, message: str) -> None:
    with EmbedClient("127.0.0.1:1") as client, pytest.raises(TypeError, match=message):
        client.embed(texts)  # type: ignore[arg-type]


def _raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as exc:  # handed back to the test's thread
        return exc
    raise AssertionError("no exception")


def test_closed_clients_refuse_every_call_alike(tiny_server: RunningServer) -> None:
    client = tiny_server.client()
    client.embed(["warm"])
    list(client.embed_stream(["start the stream loop"]))
    client.close()
    calls = {"embed": lambda: client.embed(["a"]), "embed_response": lambda: client.embed_response(["a"]),
             "tokenize": lambda: client.tokenize(["a"]), "info": client.info,
             "embed_stream": lambda: client.embed_stream(["a"])}
    for name, call in calls.items():
        with pytest.raises(EmbedError, match="the client is closed") as info:
            call()
        assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION, name

    async def run() -> list[EmbedError]:
        aclient = AsyncEmbedClient(tiny_server.target)
        await aclient.close()
        errors = []
        for call in (aclient.embed(["a"]), aclient.tokenize(["a"]), aclient.info()):
            try:
                await call
            except EmbedError as exc:
                errors.append(exc)
        try:
            aclient.embed_stream(["a"])
        except EmbedError as exc:
            errors.append(exc)
        return errors

    errors = asyncio.run(run())
    assert len(errors) == 4
    assert all(e.code is grpc.StatusCode.FAILED_PRECONDITION and "closed" in e.details for e in errors)


BAD_NUMBERS = [
    ({"dimensions": -1}, ValueError, r"dimensions must be from 0 .* to 4294967295, not -1"),
    ({"dimensions": 2**40}, ValueError, r"dimensions must be from 0 .* to 4294967295, not 1099511627776"),
    ({"dimensions": 1.5}, TypeError, r"dimensions must be an int, not float"),
    ({"dimensions": True}, TypeError, r"dimensions must be an int, not bool"),
    ({"max_tokens": -3}, ValueError, r"max_tokens must be from 0 .* to 4294967295, not -3"),
    ({"task": 2**40}, ValueError, r"task must be from -2147483648 to 2147483647, not 1099511627776"),
    ({"task": 1.5}, TypeError, r"task must be a member of Task, its name or its number, not float"),
    ({"encoding": None}, TypeError, r"encoding must be a member of Encoding, its name or its number, not NoneType"),
]
STREAM_NUMBERS = [
    ({"batch_size": 0}, ValueError, r"batch_size must be at least 1, not 0"),
    ({"batch_tokens": 2.5}, TypeError, r"batch_tokens must be an int, not float"),
    ({"window": -1}, ValueError, r"window must be at least 1, not -1"),
    ({"streams": 0}, ValueError, r"streams must be from 1 to 64, not 0"),
    ({"streams": 20_000}, ValueError, r"streams must be from 1 to 64, not 20000"),  # each opens a call
    ({"timeout": float("nan")}, ValueError, r"timeout must be a positive number of seconds or None, not nan"),
    ({"timeout": -1}, ValueError, r"timeout must be a positive number of seconds or None, not -1"),
    # No unlimited reconnect_timeout: the message must not offer None.
    ({"reconnect_timeout": None}, TypeError, r"^reconnect_timeout must be a positive number of seconds, not NoneType$"),
    ({"reconnect_timeout": 0}, ValueError, r"^reconnect_timeout must be a positive number of seconds, not 0$"),
]


@pytest.mark.parametrize(("kwargs", "kind", "message"), BAD_NUMBERS)
def test_bad_numbers_are_refused_naming_the_argument(tiny_server: RunningServer, kwargs: dict[str, object],
                                                     kind: type[Exception], message: str) -> None:
    with tiny_server.client() as client:
        with pytest.raises(kind, match=message):
            client.embed(["a"], **kwargs)  # type: ignore[arg-type]
        with pytest.raises(kind, match=message):
            list(client.embed_stream(["a"], **kwargs))  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "kind", "message"), STREAM_NUMBERS)
def test_bad_stream_settings_are_refused_naming_the_argument(tiny_server: RunningServer, kwargs: dict[str, object],
                                                             kind: type[Exception], message: str) -> None:
    with tiny_server.client() as client, pytest.raises(kind, match=message):
        list(client.embed_stream(["a"], **kwargs))  # type: ignore[arg-type]


def test_bad_client_timeouts_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds or None, not 0"):
        EmbedClient("127.0.0.1:1", timeout=0)


def test_a_text_file_streams_its_lines_without_terminators_bom_or_blank_lines(tiny_server: RunningServer,
                                                                             tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    # A UTF-8 BOM, Windows line ends, blank and whitespace-only lines inside and at the end.
    path.write_bytes("\ufefffirst line\r\nsecond line\r\n\r\n   \r\nthird line\r\n\r\n".encode())
    lines = ["first line", "second line", "third line"]
    with tiny_server.client() as client:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": "\r\n" reaches the client as it is
            batches = list(client.embed_stream(f, "search_query", batch_size=2))
        want = client.embed(lines, "search_query")
        from_text_mode = [b for b in client.embed_stream(io.StringIO("a\n\nb\n"), batch_size=5)]
    assert [t for b in batches for t in b.texts] == lines
    assert [b.start for b in batches] == [0, 2]
    assert [n for b in batches for n in b.line_numbers or []] == [1, 2, 5]  # 1-based lines of the file
    np.testing.assert_allclose(np.concatenate([b.embeddings for b in batches]), want, rtol=0, atol=1e-5)
    assert from_text_mode[0].texts == ["a", "b"] and from_text_mode[0].line_numbers == [1, 3]


def test_a_bad_line_of_a_file_is_named_by_its_line_number(tiny_server: RunningServer) -> None:
    corpus = io.StringIO("short\n\n" + "long " * 40 + "\n")
    with tiny_server.client() as client, pytest.raises(EmbedError) as info:
        list(client.embed_stream(corpus, long_text_mode="error", max_tokens=20))
    assert info.value.field == "texts[1]"
    assert "texts[1] (line 3)" in info.value.details


def test_a_binary_file_is_refused() -> None:
    with EmbedClient("127.0.0.1:1") as client, pytest.raises(TypeError, match="open it in text mode"):
        client.embed_stream(io.BytesIO(b"a\n"))
