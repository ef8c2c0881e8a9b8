"""The seam between the engine and the model: what the batcher needs of whatever computes its batches.

server.model.runner.Runner implements it in-process. A backend that runs the model in another process or
across replicas implements the same four members, and neither the batcher nor the transport changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Token rows in, pooled vectors out; called from one thread at a time (the batcher's worker)."""

    @property
    def is_padded(self) -> bool:
        """True when a batch costs rows x its longest row, False when it costs only its real tokens.

        The batch token budget counts tokens this way (server.engine.scheduling.batch_tokens), so it must
        follow what the backend's memory use grows with.
        """
        ...

    @property
    def max_batch_rows(self) -> int | None:
        """The most rows one `run` takes, or None when only the batch policy limits them."""
        ...

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled float32 vectors (before normalization), one row per input row, in order.

        Raises server.errors.OutOfMemory when the device cannot hold the batch: the batcher then splits it.
        Any other exception fails the requests of every row in the batch.
        """
        ...

    def healthy(self, rows: Sequence[Sequence[int]]) -> bool:
        """Whether `rows`, which gave finite vectors before (the warm-up's), still do.

        Asked after a batch gave NaN or infinity, to tell a model gone bad from inputs it cannot embed.
        """
        ...


__all__ = ["Backend"]
