"""The pieces a benchmark run is made of: the corpus, the sentence-transformers baselines, load from a separate
process, and the served vectors."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from bench import baseline
from bench.load import drive_from_another_process
from bench.report import RunSummary
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.model.runner import Runner
from tools.servers import RunningServer

DOCUMENT_PREFIX = "search_document: "
_SERVED_PER_REQUEST = 32  # texts per request when fetching served vectors: far within every request limit

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Corpus:
    texts: list[str]
    tokens: list[int]  # per text, as the server counts them (prefix and special tokens included)

    @property
    def prefixed(self) -> list[str]:
        return [DOCUMENT_PREFIX + t for t in self.texts]

    def describe(self) -> dict[str, int]:
        return {"texts": len(self.texts), "tokens": sum(self.tokens), "median_tokens": int(np.median(self.tokens)),
                "max_tokens": max(self.tokens)}


@dataclass
class Baselines:
    """sentence-transformers `encode` timings: tok/s of each pass, per variant."""

    passes: dict[str, list[float]] = field(default_factory=dict)
    padded_fraction: float = 0.0

    def tok_s(self, name: str) -> float:
        passes = self.passes.get(name) or self.passes.get("fp32") or [float("nan")]
        return len(passes) / sum(1 / p for p in passes)  # total tokens over total time


def drive(srv: RunningServer, mode: str, concurrency: int, requests: list[list[str]]) -> RunSummary:
    batcher = srv.app.loaded.batcher  # type: ignore[union-attr]
    before = batcher.totals.copy()
    load = drive_from_another_process(srv.target, mode, concurrency, requests)
    after = batcher.totals.copy()
    if load.errors:
        log.warning("%s c=%d: %d errors, first: %s", mode, concurrency, len(load.errors), load.errors[0])
    summary = RunSummary.of(mode, concurrency, load, before, after)
    log.info("%s c=%d: %.0f tok/s, p50 %.0f ms, padded %.1f%%", mode, concurrency, summary.tok_s,
             summary.p50_ms, 100 * summary.padded_fraction)
    return summary


def served_vectors(srv: RunningServer, texts: list[str]) -> np.ndarray:
    """The server's vectors of `texts` as search documents, at full width."""
    vectors = []
    with grpc.insecure_channel(srv.target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        for start in range(0, len(texts), _SERVED_PER_REQUEST):
            response = stub.Embed(pb.EmbedRequest(texts=texts[start : start + _SERVED_PER_REQUEST],
                                                  task=pb.TASK_SEARCH_DOCUMENT), timeout=600)
            vectors += [list(e.values) for e in response.embeddings]
    return np.array(vectors, dtype=np.float32)


class BaselineRunner:
    """sentence-transformers at fp32 and, when the server runs another variant, around the server's own model."""

    def __init__(self, path: Path, variant: str, runner: Runner, data: Corpus) -> None:
        self.data = data
        device = str(runner.device)
        self.models = {"fp32": (baseline.sentence_transformer(path, device=device), nullcontext)}
        if variant != "fp32":
            self.models[variant] = (baseline.sentence_transformer(path, runner.model, device), runner.compute_context)
        self.result = Baselines(padded_fraction=baseline.padded_fraction(data.prefixed, data.tokens))
        self.fp32_vectors: np.ndarray | None = None

    def one_pass(self) -> None:
        for name, (model, context) in self.models.items():
            timing = baseline.time_encode(model, self.data.prefixed, context)
            self.result.passes.setdefault(name, []).append(sum(self.data.tokens) / timing.seconds)
            log.info("sentence-transformers %s: %.0f tok/s", name, self.result.passes[name][-1])
            if name == "fp32" and self.fp32_vectors is None:
                self.fp32_vectors = timing.vectors


