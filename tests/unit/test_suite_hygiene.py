"""The test suite's own rules: shared helpers live in tests/helpers or tools/, once."""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = {".venv", ".git", "build", "node_modules", ".pytest_cache", ".ruff_cache"}


@functools.cache
def _modules() -> list[tuple[Path, ast.Module]]:
    """Every Python file of the repository (not the virtual environment), parsed."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
        for name in files:
            if name.endswith(".py"):
                path = Path(folder, name)
                found.append((path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"), str(path))))
    return found


def test_free_port_is_defined_once_in_the_helpers() -> None:
    defined = [f"{path}:{node.lineno}" for path, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "free_port"]
    assert defined == ["tools/ports.py:8"]


def test_no_test_module_imports_from_another() -> None:
    """A helper two test modules share belongs in tests/helpers (or tools/), not in one of them."""
    imports = [f"{path}:{node.lineno} imports {node.module}" for path, tree in _modules()
               if path.parts[0] == "tests" for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom) and node.module
               and any(part.startswith("test_") for part in node.module.split("."))]
    assert imports == []
