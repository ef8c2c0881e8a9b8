"""How far a variant's embeddings are from fp32's: cosine per text and nearest-neighbour agreement."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import numpy as np

# Standard library modules with plenty of prose docstrings: real English text on every machine.
_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "imaplib", "inspect", "ipaddress", "itertools", "json", "locale", "logging",
    "mailbox", "mimetypes", "multiprocessing.pool", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "platform", "plistlib", "poplib", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)


def stdlib_texts(count: int, min_chars: int = 40, max_chars: int = 600) -> list[str]:
    """`count` distinct docstring paragraphs of the standard library, in a fixed order."""
    seen: set[str] = set()
    texts: list[str] = []
    for name in _DOC_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module, *(obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj)
                             or inspect.isfunction(obj))]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            paragraph = " ".join(doc.split("\n\n")[0].split())
            if min_chars <= len(paragraph) <= max_chars and paragraph not in seen:
                seen.add(paragraph)
                texts.append(paragraph)
    if len(texts) < count:
        raise ValueError(f"only {len(texts)} docstring paragraphs found, {count} asked for")
    # Every module contributes: take an even spread rather than the first modules only.
    step = len(texts) / count
    return [texts[int(i * step)] for i in range(count)]


@dataclass(frozen=True)
class Agreement:
    mean_cosine: float
    min_cosine: float
    neighbour_overlap: float  # mean share of each text's top-k neighbours that fp32 also ranks top-k
    k: int


def agreement(vectors: np.ndarray, reference: np.ndarray, k: int = 10) -> Agreement:
    """Compare row i of `vectors` with row i of `reference` (both one row per text)."""
    a, r = _unit(vectors), _unit(reference)
    cosine = np.sum(a * r, axis=1)
    return Agreement(float(cosine.mean()), float(cosine.min()), _overlap(a, r, k), k)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _overlap(a: np.ndarray, r: np.ndarray, k: int) -> float:
    k = min(k, len(a) - 1)
    if k <= 0:
        return 1.0

    def neighbours(x: np.ndarray) -> np.ndarray:
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)  # a text is not its own neighbour
        return np.argsort(-sim, axis=1, kind="stable")[:, :k]

    na, nr = neighbours(a), neighbours(r)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nr, strict=True)]))
