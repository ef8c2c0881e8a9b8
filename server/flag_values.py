"""One flag value, from text to a checked value: each converter raises argparse.ArgumentTypeError with a
one-line reason that quotes the value (server.config names the flag and the variable it came from)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

UINT32 = 2**32 - 1  # Info reports the limits as uint32
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
              "gib": 2**30, "tib": 2**40}
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
# Dot-separated labels of letters, digits, '-' and '_' (container and cluster names use '_').
HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def parse_size(text: str) -> int:
    """'1.5GiB' -> 1610612736; plain numbers are bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {shown(text)} (a number of bytes, or with a unit of B, KB, MB, "
                                         "GB, TB, KiB, MiB, GiB, TiB: 800MiB, 1.5GiB, 2GB)")
    size = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if not math.isfinite(size):  # hundreds of digits
        raise argparse.ArgumentTypeError(f"{shown(text)} is too large a size")
    return int(size)


def shown(text: str) -> str:
    """The value as quoted in a message: one line, at most ~40 characters."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "..."


_N = TypeVar("_N", int, float)


def _checked(text: str, cast: Callable[[str], _N], ok: Callable[[_N], bool], wanted: str) -> _N:
    """`text` as `cast` reads it, if `ok` holds for it; else the error saying it is not `wanted`."""
    try:
        value: _N | None = cast(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not {wanted}")
    return value


# Python's int() and float() also read other scripts' digits ('٥٠٠٥١') and underscores ('1_000'): flags take
# ASCII digits only, as every other program that reads the same settings would.
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_DECIMAL = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*", re.ASCII)


def _ascii(pattern: re.Pattern[str], cast: Callable[[str], _N]) -> Callable[[str], _N]:
    def read(text: str) -> _N:
        if not pattern.fullmatch(text):
            raise ValueError(text)
        return cast(text)
    return read


def integer(low: int, high: int) -> Callable[[str], int]:
    return lambda text: _checked(text, _ascii(_INTEGER, int), lambda v: low <= v <= high,
                                 f"an integer in {low}..{high}")


def number(low: float, high: float, unit: str) -> Callable[[str], float]:
    return lambda text: _checked(text, _ascii(_DECIMAL, float), lambda v: math.isfinite(v) and low <= v <= high,
                                 f"a finite number of {unit} in {low:g}..{high:.15g}")


def rotary_factor(text: str) -> float:
    return _checked(text, _ascii(_DECIMAL, float), lambda v: math.isfinite(v) and (v == 0 or v >= 1),
                    "0 (off) or a finite number >= 1")


def zero_or_at_least(low: int, zero: str, why: str) -> Callable[[str], int]:
    """0 (meaning `zero`) or an integer in low..2**32-1, `why` being the reason for `low`."""
    return lambda text: _checked(text, _ascii(_INTEGER, int), lambda v: v == 0 or low <= v <= UINT32,
                                 f"0 ({zero}) or an integer in {low}..{UINT32} ({why})")


def memory(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a positive size (examples: 800MiB, 1.5GiB, 2GB)")
    return size


def text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("empty value")
    return text


def listen_host(text: str) -> str:
    """An IP address or a host name to listen on. IPv6 addresses may come bracketed as in URLs ([::1]) and are
    kept bare: sockets take them so, and ServerConfig.address brackets them again for grpc."""
    bracketed = text.startswith("[") and text.endswith("]")
    bare = text[1:-1] if bracketed else text
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        address = None
    if bracketed and not isinstance(address, ipaddress.IPv6Address):
        raise argparse.ArgumentTypeError(f"{shown(text)}: brackets are for IPv6 addresses only (e.g. [::1])")
    if address is None and not HOST_NAME.fullmatch(bare):
        head, _, tail = text.rpartition(":")
        port = "; the port goes in --port" if tail.isdigit() and _is_host(head) else ""
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an IP address or a host name (e.g. 0.0.0.0, "
                                         f"::, 127.0.0.1, [::1], localhost){port}")
    return bare


def _is_host(text: str) -> bool:
    try:
        listen_host(text)
        return True
    except argparse.ArgumentTypeError:
        return False


def device(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not auto, cpu, cuda or cuda:N")
    return text


def otlp_endpoint(text: str) -> str:
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number in 0..65535
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and not any(c.isspace() for c in text)
    except ValueError:
        valid = False
    if not valid:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an http:// or https:// URL with a host "
                                         "(e.g. http://collector:4317)")
    return text


def event_loop(text: str) -> str:
    from server.event_loop import CHOICES, uvloop_installed

    if text not in CHOICES:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not one of {', '.join(CHOICES)}")
    if text == "uvloop" and not uvloop_installed():
        raise argparse.ArgumentTypeError("uvloop does not import here (pip install uvloop), so only asyncio's own "
                                         "loop can run: use auto or asyncio")
    return text
