"""A simulated device allocator with a hard limit, for testing out-of-memory handling on the CPU.

Inside `MemoryCap(limit)`, any torch op whose result would take more than `limit` bytes raises
torch.OutOfMemoryError, the error CUDA's caching allocator raises, so the server's real handling runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class MemoryCap(TorchDispatchMode):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__()
        self.limit_bytes = limit_bytes
        self.largest = 0  # the largest single result seen, to calibrate a limit

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                size = t.numel() * t.element_size()
                self.largest = max(self.largest, size)
                if size > self.limit_bytes:
                    raise torch.OutOfMemoryError(
                        f"simulated allocator: tried to allocate {size} bytes; limit {self.limit_bytes}")
        return out


def capped(inner: Callable[[], AbstractContextManager[object]], cap: MemoryCap
           ) -> Callable[[], AbstractContextManager[object]]:
    """A runner compute context: the runner's own, with `cap` inside it."""

    @contextmanager
    def context():  # type: ignore[no-untyped-def]
        with ExitStack() as stack:
            stack.enter_context(inner())
            stack.enter_context(cap)
            yield

    return context
