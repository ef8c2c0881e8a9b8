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


def usable_rows(pooled: np.ndarray) -> np.ndarray:
    """Per row of a batch's pooled vectors, whether it may be served: finite, and not one value in every
    component (what a model gone bad gives: layer_norm and L2 normalization would make it zero or a fixed
    direction, the same for every text)."""
    finite = np.isfinite(pooled).all(axis=1)
    return finite & (pooled != pooled[:, :1]).any(axis=1) if pooled.shape[1] > 1 else finite


# Fewer tokens per text than this leave no room for a task prefix and text between the special tokens.
MIN_MAX_TOKENS = 16
NOMIC_MIN_DIMENSIONS = 64  # the smallest Matryoshka width nomic-embed-text-v1.5 was trained for


@dataclass(frozen=True)
class ModelFacts:
    """What the served checkpoint is: read once at start-up (server.model.spec), asked by every layer."""

    model_id: str  # as the operator named it: hub id, directory or short name
    revision: str  # the commit the files are at where known, else the revision asked for; "" = unknown
    hidden_size: int
    num_layers: int
    max_input_tokens: int  # the checkpoint's input limit (n_positions, capped by sentence-transformers)
    trained_positions: int  # beyond them dynamic NTK rotary scaling applies; 0 = no rotary positions
    pooling: str  # "mean" or "cls"
    nomic: bool  # the nomic recipe: task prefixes, Matryoshka widths, layer_norm before truncation

    @property
    def task_prefixes(self) -> bool:
        return self.nomic

    @property
    def layer_norm_before_truncation(self) -> bool:
        return self.nomic

    @property
    def min_dimensions(self) -> int:
        return min(NOMIC_MIN_DIMENSIONS, self.hidden_size) if self.nomic else self.hidden_size


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


# Lower case, accents stripped, word pieces: what an uncased WordPiece tokenizer must make of it.
PLAIN_ENGLISH = "Embeddings: the quick brown fox jumps over the lazy dog in a café."


@dataclass(frozen=True)
class TokenizerProbe:
    """A text and the ids the model's own vocabulary gives it, and the special tokens around a sequence."""

    vocabulary: str
    text: str
    ids: tuple[int, ...]  # without special tokens
    head: tuple[int, ...]  # e.g. [CLS]
    tail: tuple[int, ...]  # e.g. [SEP]
    size: int  # entries in the vocabulary
    digest: str  # sha256 of its tokens in id order, joined by newlines: vocab.txt's lines


# bert-base-uncased WordPiece, the vocabulary of nomic-embed-text-v1.5 (and of all-MiniLM-L6-v2). Beyond plain
# English, what each switch of BERT's normalizer changes: CJK characters split one per token (not one word),
# and a control character dropped (not kept as a word of its own).
BERT_UNCASED_PROBE = TokenizerProbe(
    "bert-base-uncased", PLAIN_ENGLISH + " 東京\x07",
    (7861, 8270, 4667, 2015, 1024, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1999, 1037, 7668, 1012,
     1879, 1755),
    head=(101,), tail=(102,), size=30522,
    digest="0f052197aac305fe42f378b5c61554b7bacb34b8be4af83fec2cfdcdffbc9973")
