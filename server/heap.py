"""What start-up leaves alive, kept out of the cyclic garbage collector's scans while the server serves.

Once torch, transformers, grpc and the model are loaded, the interpreter tracks ~400k objects, and every full
collection walks all of them: 150-160 ms each on our 2-core CPU, a pause of the event loop and of every call
in flight. Under load full collections come every few seconds, since the objects of calls in flight survive
the young collections. Frozen, those objects are still freed by reference counting as ever, only never scanned
for cycles; objects made later are collected as usual.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect what start-up left as garbage, then move every object alive into the permanent generation.

    Returns how many objects are frozen."""
    started = time.monotonic()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("%d start-up objects kept out of garbage collection (%.2fs)", frozen, time.monotonic() - started)
    return frozen


def thaw() -> None:
    """Hand the frozen objects back to the collector: a stopped server's cycles may be garbage now."""
    gc.unfreeze()


__all__ = ["freeze_startup_objects", "thaw"]
