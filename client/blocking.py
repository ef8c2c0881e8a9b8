"""The blocking face of the asyncio stream: an event loop on a thread owned by the client."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from concurrent.futures import CancelledError, Future
from typing import Any, TypeVar

from client.errors import client_closed
from client.results import EmbeddedBatch
from client.stream import AsyncEmbedStream, StreamStats

T = TypeVar("T")


class LoopClosed(RuntimeError):
    """The loop is closing or closed: work submitted now would never run."""


class LoopThread:
    """One event loop on one daemon thread; `close()` stops and joins it.

    Work submitted once `close()` has begun is refused (LoopClosed) rather than left waiting on a loop that
    stops; work submitted before is cancelled by the close, from whichever thread closes it."""

    def __init__(self, name: str = "embed-client-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._lock = threading.Lock()
        self._closing = False
        self._thread.start()

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        with self._lock:
            if self._closing:
                coro.close()
                raise LoopClosed("the client's event loop is closed")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            cancelled = asyncio.run_coroutine_threadsafe(_cancel_others(), self.loop)
        cancelled.result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _cancel_others() -> None:
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class EmbedStream:
    """Iterator of EmbeddedBatch in input order. `close()` (or leaving a `with` block, or dropping the
    iterator) cancels the stream and everything in flight."""

    def __init__(self, loop: LoopThread, stream: AsyncEmbedStream) -> None:
        self._loop = loop
        self._stream = stream
        self._closed = False

    @property
    def stats(self) -> StreamStats:
        return self._stream.stats

    def __iter__(self) -> EmbedStream:
        return self

    def __next__(self) -> EmbeddedBatch:
        if self._closed:
            raise StopIteration
        try:
            future = self._loop.submit(self._stream.__anext__())
        except LoopClosed:
            self._closed = True
            raise client_closed() from None
        try:
            return future.result()
        except StopAsyncIteration:
            self._closed = True
            raise StopIteration from None
        except CancelledError:  # the client's close, from another thread, cancelled the loop's tasks
            self._closed = True
            raise client_closed() from None
        except BaseException:  # an error of the stream, or KeyboardInterrupt while waiting
            future.cancel()
            self.close()
            raise

    def close(self) -> None:
        if self._closed or self._loop.closing:
            return
        self._closed = True
        if self._loop.on_loop_thread():  # dropped on the loop's own thread: cannot wait there
            self._loop.loop.create_task(self._stream.aclose())
            return
        # The client's close may begin meanwhile, from another thread: it cancels this too, and that is the end.
        with contextlib.suppress(LoopClosed, CancelledError):
            self._loop.run(self._stream.aclose())

    def __enter__(self) -> EmbedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

