"""A bounded coverage-guided fuzz run of request validation (atheris, in a subprocess of about 20 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.fuzz
ROOT = Path(__file__).resolve().parents[2]


def test_validation_survives_a_bounded_fuzz_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_validation", "-runs=100000", "-max_total_time=20",
         f"-artifact_prefix={tmp_path}/"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-3000:]
    assert "Done" in report, report[-3000:]
