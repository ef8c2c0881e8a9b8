"""While it serves, the server keeps start-up's objects out of the cyclic garbage collector's full scans."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from tools.servers import running_server


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_start_up_objects_are_frozen_while_serving_and_thawed_after(tiny_original: Path) -> None:
    gc.unfreeze()  # whatever another server of this process froze
    with running_server(str(tiny_original)) as srv:
        # torch, transformers, grpc and the model: far more than the few thousand a bare interpreter holds
        assert gc.get_freeze_count() > 50_000
        assert len(srv.client().embed(["still answers"])) == 1
        later = _Node()  # made after start-up: collected as usual
        alive = weakref.ref(later)
        del later
        gc.collect()
        assert alive() is None
    assert gc.get_freeze_count() == 0
