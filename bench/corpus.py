"""Real English text of mixed length that every machine has: the docstrings of the Python standard library.

Read from the library's source with `ast` (nothing is imported), whitespace collapsed, deduplicated and
sorted, so the same Python version always yields the same corpus; a seeded sample picks the texts.
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

MIN_CHARS = 40  # shorter docstrings are mostly "Return self." boilerplate
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "turtledemo"}


def stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    texts.add(" ".join(doc.split()))
    return sorted(texts)


def cached_docstrings(cache_dir: Path) -> list[str]:
    """The docstrings, parsed once per Python version (parsing the library takes seconds)."""
    path = cache_dir / f"stdlib-docstrings-py{sys.version_info.major}.{sys.version_info.minor}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    texts = stdlib_docstrings()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(texts), encoding="utf-8")
    tmp.replace(path)
    return texts


def sample(texts: Sequence[str], token_counts: Sequence[int], n: int, *, max_tokens: int,
           seed: int = 0) -> list[int]:
    """Indices of `n` texts of at most `max_tokens` tokens, drawn at random with a fixed seed."""
    fitting = [i for i, count in enumerate(token_counts) if count <= max_tokens]
    if len(fitting) < n:
        raise ValueError(f"only {len(fitting)} docstrings have at most {max_tokens} tokens; asked for {n}")
    return random.Random(seed).sample(fitting, n)
