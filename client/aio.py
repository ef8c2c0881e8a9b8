"""The asyncio client: `async with AsyncEmbedClient() as c: vectors = await c.embed(["a text"])`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar, overload

import grpc
import numpy as np

from client.checks import check_response, checked_embeddings
from client.connection import DEFAULT_TARGET, Tls
from client.embed_client import DEFAULT_RETRY, ClientSettings
from client.errors import from_rpc_error
from client.options import EmbedOptions, Encoding, LongTextMode, Task, text_list
from client.results import ServerInfo
from client.retry import Deadline, RetryPolicy
from client.stream import AsyncEmbedStream
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class AsyncEmbedClient(ClientSettings):
    """Asyncio client with the blocking client's methods.

    A grpc.aio channel belongs to one event loop: the client opens its channel in the loop of its first call
    and serves calls from that loop only. Once that loop has closed (a second `asyncio.run`), the next call
    opens a new channel in its own loop; a call from another loop while the first still runs is refused.
    """

    def __init__(self, servers: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float | None = 60.0,
                 tls: Tls | bool | None = None, token: str | None = None, load_balancing: str | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        super().__init__(servers, timeout=timeout, tls=tls, token=token, load_balancing=load_balancing,
                         retry=retry)
        self._channel: grpc.aio.Channel | None = None
        self._channel_loop: asyncio.AbstractEventLoop | None = None
        self._stub_of_loop: embed_pb2_grpc.EmbedServiceStub | None = None

    @property
    def _stub(self) -> embed_pb2_grpc.EmbedServiceStub:
        self._loop_channel()
        assert self._stub_of_loop is not None
        return self._stub_of_loop

    def _loop_channel(self) -> grpc.aio.Channel:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncEmbedClient works inside a running event loop (from async code); "
                               "EmbedClient is the blocking client") from None
        if self._channel is None or (self._channel_loop is not loop and self._channel_loop.is_closed()):
            self._channel, self._channel_loop = self.connection.aio_channel(), loop
            self._stub_of_loop = embed_pb2_grpc.EmbedServiceStub(self._channel)
        elif self._channel_loop is not loop:
            raise RuntimeError("this AsyncEmbedClient serves another event loop, which is still running; "
                               "create one client per event loop")
        return self._channel

    async def close(self) -> None:
        """Close the channel, cancelling its calls and streams; from any loop (a closed loop took its
        channel's calls with it)."""
        self._closed = True
        channel, loop = self._channel, self._channel_loop
        if channel is None or loop is None:
            return
        if loop is asyncio.get_running_loop():
            await channel.close()
        elif loop.is_running():  # on another thread: the channel closes on its own loop
            closing = asyncio.run_coroutine_threadsafe(channel.close(), loop)
            waiting = asyncio.wrap_future(closing)
            while not (await asyncio.wait({waiting}, timeout=0.1))[0]:
                if not loop.is_running():  # it stopped first: its calls stopped with it
                    closing.cancel()
                    return
            waiting.result()

    async def __aenter__(self) -> AsyncEmbedClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[Resp]], request: Req) -> Resp:
        deadline = Deadline(self.timeout)
        failures = 0
        while True:
            try:
                return await method(request, timeout=deadline.remaining(), metadata=self.connection.metadata)
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                failures += 1
                delay = self.retry.next_delay(error, failures, deadline)
                if delay is None:
                    raise error from None
                await asyncio.sleep(delay)

    async def embed(self, texts: str | Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT,
                    dimensions: int = 0, *, long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE,
                    max_tokens: int = 0, encoding: Encoding | str | int = Encoding.FLOAT32) -> np.ndarray:
        """Embeddings of `texts`, shape (len(texts), dimensions or full width), dtype of the encoding;
        one str is one text, and its vector comes back alone: shape (width,)."""
        self._check_open()
        options = EmbedOptions.of(task, dimensions, long_text_mode=long_text_mode, max_tokens=max_tokens,
                                  encoding=encoding)
        batch = text_list(texts)
        vectors = checked_embeddings(await self._call(self._stub.Embed, options.request(batch)), len(batch), options)
        return vectors[0] if isinstance(texts, str) else vectors

    async def embed_response(self, texts: str | Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT,
                             dimensions: int = 0, *, long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE,
                             max_tokens: int = 0, encoding: Encoding | str | int = Encoding.VALUES
                             ) -> pb.EmbedResponse:
        self._check_open()
        options = EmbedOptions.of(task, dimensions, long_text_mode=long_text_mode, max_tokens=max_tokens,
                                  encoding=encoding)
        batch = text_list(texts)
        return check_response(await self._call(self._stub.Embed, options.request(batch)), len(batch), options)

    def embed_stream(self, texts: Iterable[str] | AsyncIterable[str], task: Task | str | int = Task.SEARCH_DOCUMENT,
                     dimensions: int = 0, *, long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE,
                     max_tokens: int = 0, encoding: Encoding | str | int = Encoding.FLOAT32, batch_size: int = 64,
                     batch_tokens: int = 8192, window: int = 4, streams: int = 1,
                     timeout: float | None = None, reconnect_timeout: float = 60.0,
                     answer_timeout: float | None = None) -> AsyncEmbedStream:
        """`async for batch in client.embed_stream(texts)`: as EmbedClient.embed_stream."""
        self._check_open()
        options = EmbedOptions.of(task, dimensions, long_text_mode=long_text_mode, max_tokens=max_tokens,
                                  encoding=encoding)
        settings = self.stream_settings(batch_size, batch_tokens, window, streams, timeout, reconnect_timeout,
                                        answer_timeout)
        return AsyncEmbedStream(self._loop_channel(), texts, options, settings, self.retry, self.connection.metadata,
                                loop=self._channel_loop)

    @overload
    async def tokenize(self, texts: str, task: Task | str | int = ...) -> list[int]: ...
    @overload
    async def tokenize(self, texts: Sequence[str], task: Task | str | int = ...) -> list[list[int]]: ...

    async def tokenize(self, texts: str | Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT
                       ) -> list[int] | list[list[int]]:
        self._check_open()
        request = pb.TokenizeRequest(texts=text_list(texts), task=int(EmbedOptions.of(task).task))
        ids = [list(t.ids) for t in (await self._call(self._stub.Tokenize, request)).texts]
        return ids[0] if isinstance(texts, str) else ids

    async def info(self) -> ServerInfo:
        self._check_open()
        return ServerInfo.from_pb(await self._call(self._stub.Info, pb.InfoRequest()))
