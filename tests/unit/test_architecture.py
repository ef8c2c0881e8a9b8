"""The layers' import contract, checked on the source: who may import grpc, torch and the proto, and module sizes.

transport/ is the only part of the server that speaks gRPC; engine/ knows neither gRPC nor torch; model/ is the
only part that runs torch and never speaks gRPC; quant/ is pure policy below all of them. server/app.py (the one
place that wires everything; server/loading.py wires the model's side for it) and server/__main__.py may
import anything. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GRPC = {"grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.rpc", "nomic_embed"}
TORCH = {"torch", "transformers", "safetensors", "bitsandbytes", "accelerate", "sentence_transformers"}
WIRING = {"server/app.py", "server/__main__.py"}
# (files, what they must not import, why)
CONTRACT = [
    ("server/transport", TORCH, "transport speaks gRPC and never runs the model"),
    ("server/engine", GRPC | TORCH, "the engine knows neither gRPC nor torch"),
    ("server/model", GRPC, "the model never speaks gRPC"),
    ("server/observability", GRPC | TORCH, "observability records; interceptors live in transport"),
    ("server/domain.py", GRPC | TORCH, "domain types are shared by every layer"),
    ("server/errors.py", GRPC | TORCH, "domain errors are mapped to status codes in transport only"),
    ("server/config.py", GRPC | TORCH, "configuration is read before anything heavy is imported"),
    ("quant", {"server", "tools", "tests"} | GRPC | TORCH, "quant is pure policy beneath the server"),
    ("tools", {"tests"}, "shipped tools do not depend on the test suite"),
    ("bench", {"tests"}, "shipped benchmarks do not depend on the test suite"),
    ("loadtest", {"tests"}, "the shipped load test does not depend on the test suite"),
    ("scripts", {"tests"}, "shipped scripts do not depend on the test suite"),
    ("client", {"server", "tests"} | TORCH, "the client is the API's, not the server's"),
]
MAX_LINES = 400
SIZED = ("server", "quant", "client", "tools")


def _python_files(where: str) -> list[Path]:
    path = ROOT / where
    return [path] if path.is_file() else sorted(path.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _hits(module: str, forbidden: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize(("where", "forbidden", "why"), CONTRACT, ids=[c[0] for c in CONTRACT])
def test_layer_imports(where: str, forbidden: set[str], why: str) -> None:
    broken = [f"{path.relative_to(ROOT)} imports {module}" for path in _python_files(where)
              for module in sorted(_imports(path)) if _hits(module, forbidden)]
    assert broken == [], why


@pytest.mark.parametrize(("library", "home"), [(GRPC, "server/transport"), (TORCH, "server/model")],
                         ids=["grpc-in-transport", "torch-in-model"])
def test_only_one_layer_of_the_server_imports_each_library(library: set[str], home: str) -> None:
    outside = [f"{path.relative_to(ROOT)} imports {module}" for path in _python_files("server")
               if not path.is_relative_to(ROOT / home) and str(path.relative_to(ROOT)) not in WIRING
               for module in sorted(_imports(path)) if _hits(module, library)]
    assert outside == []


def test_the_supervisor_loads_neither_grpc_nor_torch() -> None:
    """--workers' supervisor, with the configuration it reads, imports nothing heavy, even indirectly."""
    roots = sorted({name.split(".")[0] for name in GRPC | TORCH})
    code = f"import sys, server.supervisor; print(sorted(m for m in sys.modules if m.split('.')[0] in {roots!r}))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_the_contract_sees_imports() -> None:
    """The checker itself: it finds a forbidden import at module level and inside a function."""
    assert _hits("torch.nn", TORCH) and _hits("grpc", GRPC) and not _hits("grpcio_tools", GRPC)
    found = _imports(ROOT / "server" / "model" / "runner.py")
    assert "torch" in found and "server.model.unpadded" in found


def test_no_module_is_over_the_size_limit() -> None:
    large = {str(p.relative_to(ROOT)): n for where in SIZED for p in _python_files(where)
             if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert large == {}
