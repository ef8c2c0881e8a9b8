"""Every variant the device runs, side by side on the same corpus in one run (`make bench`, `--compare`).

For each variant, in turn: the server serving it (in this process, as the main run), one text per request
from a separate process at the given concurrency, unary; sentence-transformers `encode` at fp32 and around
the server's own model (its variant), a pass before and one after the server's run; and the cosine of every
served vector to sentence-transformers' fp32 vector of the same text after the model card's steps.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving import BaselineRunner, Corpus, drive, served_vectors
from quant.variants import VARIANTS
from server.engine.matryoshka import finish_rows
from tools.servers import running_server

log = logging.getLogger("bench")


@dataclass(frozen=True)
class VariantResult:
    variant: str
    tok_s: float = float("nan")
    p50_ms: float = float("nan")
    st_fp32_tok_s: float = float("nan")
    st_same_tok_s: float = float("nan")  # sentence-transformers around the server's model of this variant
    mean_cos: float = float("nan")  # to sentence-transformers fp32, after layer norm and L2 normalization
    min_cos: float = float("nan")
    ready_s: float = float("nan")  # start-up to SERVING: loading, quantizing, compiling, warm-up
    errors: int = 0
    failed: str = ""  # why the variant could not be measured

    def as_dict(self) -> dict[str, Any]:
        """Its fields, with None for what was not measured (JSON has no NaN)."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> VariantResult:
        return cls(**{k: float("nan") if v is None else v for k, v in fields.items()})


def device_variants(device_kind: str) -> list[str]:
    """The variants that run on a device kind, most precise first."""
    return [v.name for v in sorted(VARIANTS.values(), key=lambda v: -v.rank) if device_kind in v.devices]


def parse_compare(value: str, device_kind: str) -> list[str]:
    """`--compare`: all (every variant the device runs), none, or names separated by commas."""
    if value.strip().lower() == "all":
        return device_variants(device_kind)
    if value.strip().lower() == "none":
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


def compare(path: Path, data: Corpus, variants: list[str], concurrency: int, overrides: dict[str, Any],
            baselines: bool = True) -> list[VariantResult]:
    """Measure each variant in turn; one that fails to load or run is reported, and the others still run.

    Without `baselines`, sentence-transformers is left out: no ratios, no cosines."""
    results = []
    for variant in variants:
        try:
            results.append(_measure(path, data, variant, concurrency, overrides, baselines))
        except Exception as exc:  # e.g. a variant this machine cannot load: the table says so
            log.exception("variant %s failed", variant)
            results.append(VariantResult(variant, failed=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    return results


def _measure(path: Path, data: Corpus, variant: str, concurrency: int, overrides: dict[str, Any],
             with_baselines: bool) -> VariantResult:
    started = time.monotonic()
    with running_server(str(path), **{**overrides, "variant": variant}) as srv:
        ready_s = time.monotonic() - started
        loaded = srv.app.loaded
        assert loaded is not None
        if not with_baselines:
            run = drive(srv, "unary", concurrency, [[t] for t in data.texts])
            log.info("variant %s: %.0f tok/s", variant, run.tok_s)
            return VariantResult(variant, run.tok_s, run.p50_ms, ready_s=ready_s, errors=run.errors)
        baselines = BaselineRunner(path, variant, loaded.runner, data)
        baselines.one_pass()
        assert baselines.fp32_vectors is not None
        want = finish_rows(baselines.fp32_vectors, baselines.fp32_vectors.shape[1], layer_norm=True)
        cosines = np.sum(served_vectors(srv, data.texts).astype(np.float64) * want, axis=1)
        run = drive(srv, "unary", concurrency, [[t] for t in data.texts])
        baselines.one_pass()
    log.info("variant %s: %.0f tok/s, mean cos %.5f", variant, run.tok_s, cosines.mean())
    return VariantResult(variant, run.tok_s, run.p50_ms, baselines.result.tok_s("fp32"),
                         baselines.result.tok_s(variant), float(cosines.mean()), float(cosines.min()), ready_s,
                         run.errors)


def table(results: list[VariantResult], concurrency: int) -> str:
    """A markdown table: each variant served at `concurrency`, against sentence-transformers in the same run."""
    lines = [f"every variant, unary, one text per request, concurrency {concurrency}:",
             "| variant | tok/s | p50 ms | x ST fp32 | x ST same variant | mean cos to fp32 | min cos | ready s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        if r.failed:
            lines.append(f"| {r.variant} | failed: {r.failed} |")
            continue
        lines.append(f"| {r.variant} | {r.tok_s:,.0f} | {r.p50_ms:,.0f} | {_fmt(r.tok_s / r.st_fp32_tok_s, '.2f')} | "
                     f"{_fmt(r.tok_s / r.st_same_tok_s, '.2f')} | {_fmt(r.mean_cos, '.5f')} | "
                     f"{_fmt(r.min_cos, '.5f')} | {r.ready_s:.1f} |" + (f" {r.errors} errors" if r.errors else ""))
    return "\n".join(lines)


def _fmt(value: float, spec: str) -> str:
    return "n/a" if math.isnan(value) else format(value, spec)
