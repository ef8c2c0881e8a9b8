"""Domain types shared by the service, the embedder and the batcher (no grpc, no torch)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class Task(enum.Enum):
    """A task selects the prefix the nomic models were trained with."""

    SEARCH_DOCUMENT = "search_document"
    SEARCH_QUERY = "search_query"
    CLUSTERING = "clustering"
    CLASSIFICATION = "classification"
    RAW = "raw"  # the text carries its own prefix

    @property
    def prefix(self) -> str:
        return "" if self is Task.RAW else f"{self.value}: "


class LongTextMode(enum.Enum):
    TRUNCATE = "truncate"
    ERROR = "error"
    MEAN = "mean"


@dataclass(frozen=True)
class EmbedOptions:
    task: Task
    dimensions: int  # resolved: the full width when the caller asked for 0
    long_text_mode: LongTextMode
    max_tokens: int  # resolved: the server's limit when the caller asked for 0


@dataclass(frozen=True)
class Embedding:
    vector: np.ndarray  # float32, L2-normalized
    tokens: int
    truncated: bool
    windows: int


@dataclass(frozen=True)
class Timings:
    queue_s: float
    inference_s: float
    total_s: float


@dataclass(frozen=True)
class EmbedResult:
    embeddings: list[Embedding]
    timings: Timings

    @property
    def total_tokens(self) -> int:
        return sum(e.tokens for e in self.embeddings)


@dataclass(frozen=True)
class Limits:
    """Bounds enforced per request and per model batch."""

    max_texts_per_request: int
    max_input_tokens: int
    max_text_chars: int
    max_batch_tokens: int
    max_batch_rows: int
    max_queue_tokens: int
    max_request_tokens: int = 262_144  # tokens the model reads for one request, all texts together
    max_request_bytes: int = 16 * 2**20  # serialized size of one request
