"""The event loop the server runs on: uvloop where it is installed, else asyncio's own.

uvloop runs the same grpc.aio server for less CPU per call: on 2 cores, one-text calls from 64 callers
took 7-11% less CPU in this server with it, and 15-24% less in a bare grpc.aio echo (docs/benchmarks.md,
"Host cost").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_installed() -> bool:
    """Whether uvloop imports here (installed, and its compiled part loads)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """New loops of the chosen kind; `auto` is uvloop when installed."""
    if choice not in CHOICES:
        raise ValueError(f"unknown event loop {choice!r}; choose one of {', '.join(CHOICES)}")
    if resolved(choice) == "asyncio":
        return asyncio.new_event_loop
    import uvloop

    return uvloop.new_event_loop


def resolved(choice: str) -> str:
    """The kind of loop `choice` makes here: auto resolved."""
    return "uvloop" if choice == "uvloop" or (choice == "auto" and uvloop_installed()) else "asyncio"


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
