"""A blocking call on a daemon thread, awaited from the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")
LOADER_THREAD = "model-loader"


async def in_daemon_thread(fn: Callable[..., _T], *args: object) -> _T:
    """Run `fn` on a daemon thread: unlike asyncio.to_thread, nothing waits for it when the process exits.

    Loading cannot be interrupted inside a download or torch, and a stop must not wait for it to finish.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for this result any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=LOADER_THREAD, daemon=True).start()
    return await future


__all__ = ["LOADER_THREAD", "in_daemon_thread"]
