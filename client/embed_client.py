"""The blocking client: `EmbedClient("localhost:50051").embed(["a text"], "search_query")`."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from typing import TypeVar, overload

import grpc
import numpy as np

from client.batching import BatchLimits
from client.blocking import EmbedStream, LoopClosed, LoopThread
from client.checks import check_response, checked_embeddings
from client.connection import DEFAULT_TARGET, Connection, Tls, connect
from client.errors import EmbedError, from_rpc_error
from client.options import (
    EmbedOptions,
    Encoding,
    LongTextMode,
    Task,
    positive_seconds,
    seconds,
    text_list,
    whole_number,
)
from client.results import ServerInfo, decode_embeddings
from client.retry import Deadline, RetryPolicy
from client.stream import AsyncEmbedStream, StreamSettings
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

__all__ = ["EmbedClient", "EmbedError", "Encoding", "LongTextMode", "ServerInfo", "Task", "embeddings_array"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
DEFAULT_RETRY = RetryPolicy()


# Concurrent streams of one embed_stream: one per server behind a target is the use, and each opens a call.
MAX_STREAMS = 64


class ClientSettings:
    """What the blocking and the asyncio clients share: the connection, the per-call timeout, retries."""

    def __init__(self, servers: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = 60.0,
                 tls: Tls | bool | None = None, token: str | None = None, load_balancing: str | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self.timeout = seconds("timeout", timeout)  # per call, retries included
        self.connection: Connection = connect(servers, tls=tls, token=token, load_balancing=load_balancing)
        self.retry = retry
        self._closed = False

    def _check_open(self) -> None:
        """Every call on a closed client, streams included, fails alike, before anything is sent."""
        if self._closed:
            raise EmbedError(grpc.StatusCode.FAILED_PRECONDITION, "the client is closed")

    def stream_settings(self, batch_size: int, batch_tokens: int, window: int, streams: int,
                        timeout: float | None, reconnect_timeout: float,
                        answer_timeout: float | None = None) -> StreamSettings:
        limits = BatchLimits(whole_number("batch_size", batch_size, 1), whole_number("batch_tokens", batch_tokens, 1))
        reconnect = positive_seconds("reconnect_timeout", reconnect_timeout)
        lanes = whole_number("streams", streams, 1, MAX_STREAMS)
        return StreamSettings(limits, whole_number("window", window, 1), lanes, seconds("timeout", timeout), reconnect,
                              seconds("answer_timeout", answer_timeout))


class EmbedClient(ClientSettings):
    """Blocking client. `servers`: "host:port", several of them, or a gRPC target such as
    "dns:///name:port" (see client.connection.connect for TLS, tokens and load balancing)."""

    def __init__(self, servers: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = 60.0,
                 tls: Tls | bool | None = None, token: str | None = None, load_balancing: str | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY, channel: grpc.Channel | None = None) -> None:
        super().__init__(servers, timeout=timeout, tls=tls, token=token, load_balancing=load_balancing,
                         retry=retry)
        self._channel = channel or self.connection.channel()
        self._stub = embed_pb2_grpc.EmbedServiceStub(self._channel)
        self._loop: LoopThread | None = None  # started by the first embed_stream
        self._streams_lock = threading.Lock()
        self._aio_channel: grpc.aio.Channel | None = None

    def close(self) -> None:
        with self._streams_lock:
            self._closed = True
            loop, self._loop = self._loop, None
        self._channel.close()
        if loop is not None:
            if self._aio_channel is not None:
                with contextlib.suppress(LoopClosed):  # closed by another thread meanwhile
                    loop.run(self._aio_channel.close())
            loop.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Resp], request: Req) -> Resp:
        deadline = Deadline(self.timeout)
        failures = 0
        while True:
            try:
                return method(request, timeout=deadline.remaining(), metadata=self.connection.metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                failures += 1
                delay = self.retry.next_delay(error, failures, deadline)
                if delay is None or self._closed:  # closing the client mid-call cancels the call: final
                    raise error from None
                time.sleep(delay)

    def embed(self, texts: str | Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT, dimensions: int = 0,
              *, long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE, max_tokens: int = 0,
              encoding: Encoding | str | int = Encoding.FLOAT32) -> np.ndarray:
        """Embeddings of `texts`, shape (len(texts), dimensions or full width), dtype of the encoding;
        one str is one text, and its vector comes back alone: shape (width,)."""
        self._check_open()
        options = EmbedOptions.of(task, dimensions, long_text_mode=long_text_mode, max_tokens=max_tokens,
                                  encoding=encoding)
        batch = text_list(texts)
        vectors = checked_embeddings(self._call(self._stub.Embed, options.request(batch)), len(batch), options)
        return vectors[0] if isinstance(texts, str) else vectors

    def embed_response(self, texts: str | Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT,
                       dimensions: int = 0, *, long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE,
                       max_tokens: int = 0, encoding: Encoding | str | int = Encoding.VALUES) -> pb.EmbedResponse:
        """The raw response, with per-text token counts and timings (one str is one text)."""
        self._check_open()
        options = EmbedOptions.of(task, dimensions, long_text_mode=long_text_mode, max_tokens=max_tokens,
                                  encoding=encoding)
        batch = text_list(texts)
        return check_response(self._call(self._stub.Embed, options.request(batch)), len(batch), options)

    def embed_stream(self, texts: Iterable[str] | AsyncIterable[str], task: Task | str | int = Task.SEARCH_DOCUMENT,
                     dimensions: int = 0, *, long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE,
                     max_tokens: int = 0, encoding: Encoding | str | int = Encoding.FLOAT32, batch_size: int = 64,
                     batch_tokens: int = 8192, window: int = 4, streams: int = 1,
                     timeout: float | None = None, reconnect_timeout: float = 60.0,
                     answer_timeout: float | None = None) -> EmbedStream:
        """Embed any number of texts over EmbedStream; iterate for EmbeddedBatch in input order.

        Batches hold up to `batch_size` texts and about `batch_tokens` tokens; `window` batches are in flight;
        `streams` streams run at once; `timeout` bounds the whole input (None: no limit). After a stream
        breaks, a server is waited for until no batch has been answered for `reconnect_timeout` seconds; a
        batch refused as overloaded is sent again for as long. With `answer_timeout`, batches in flight and no
        answer for that long count as a break (a server that answers pings but not the stream); None waits, as
        for a deep queue. A text file gives its lines (see client.stream for files, retries and reconnection).
        """
        self._check_open()
        options = EmbedOptions.of(task, dimensions, long_text_mode=long_text_mode, max_tokens=max_tokens,
                                  encoding=encoding)
        settings = self.stream_settings(batch_size, batch_tokens, window, streams, timeout, reconnect_timeout,
                                        answer_timeout)
        with self._streams_lock:  # the first streams of several threads share one loop; a close may race them
            self._check_open()
            if self._loop is None:
                self._loop = LoopThread()
                self._aio_channel = self._loop.run(_make_aio_channel(self.connection))
            loop, channel = self._loop, self._aio_channel
        assert channel is not None
        return EmbedStream(loop, AsyncEmbedStream(channel, texts, options, settings, self.retry,
                                                  self.connection.metadata, loop=loop.loop))

    @overload
    def tokenize(self, texts: str, task: Task | str | int = ...) -> list[int]: ...
    @overload
    def tokenize(self, texts: Sequence[str], task: Task | str | int = ...) -> list[list[int]]: ...

    def tokenize(self, texts: str | Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT
                 ) -> list[int] | list[list[int]]:
        """Token ids per text, task prefix and special tokens included; one str gives its ids alone."""
        self._check_open()
        request = pb.TokenizeRequest(texts=text_list(texts), task=int(EmbedOptions.of(task).task))
        ids = [list(t.ids) for t in self._call(self._stub.Tokenize, request).texts]
        return ids[0] if isinstance(texts, str) else ids

    def info(self) -> ServerInfo:
        self._check_open()
        return ServerInfo.from_pb(self._call(self._stub.Info, pb.InfoRequest()))


async def _make_aio_channel(connection: Connection) -> grpc.aio.Channel:
    return connection.aio_channel()  # inside the loop that will use it


def embeddings_array(response: pb.EmbedResponse) -> np.ndarray:
    """The embeddings of a raw response as a numpy array (see client.results.decode_embeddings)."""
    return decode_embeddings(response)
