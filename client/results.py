"""Responses -> Python values: embeddings decoded to numpy, server info, streamed batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nomic_embed.v1 import embed_pb2 as pb

# Packed layouts, as documented on the Encoding enum of embed.proto.
_DTYPES = {
    pb.ENCODING_FLOAT32: np.dtype("<f4"),
    pb.ENCODING_FLOAT16: np.dtype("<f2"),
    pb.ENCODING_INT8: np.dtype("i1"),
    pb.ENCODING_UBINARY: np.dtype("u1"),
}


def row_width(encoding: int, dimensions: int) -> int:
    """Items per decoded row: one per dimension, or one byte per 8 dimensions for ubinary."""
    return -(-dimensions // 8) if encoding == pb.ENCODING_UBINARY else dimensions


def decode_embeddings(response: pb.EmbedResponse) -> np.ndarray:
    """(texts, width) array in the dtype of the response's encoding (metadata.encoding says which).

    Servers that predate packed encodings answer with values and an unset encoding: decoded as float32.
    """
    embeddings = response.embeddings
    encoding = response.metadata.encoding
    width = row_width(encoding, response.metadata.dimensions)
    if encoding == pb.ENCODING_UNSPECIFIED:
        if not embeddings:
            return np.zeros((0, width), np.float32)
        return np.array([e.values for e in embeddings], dtype=np.float32)
    dtype = _DTYPES.get(encoding)
    if dtype is None:
        raise ValueError(f"the server used encoding {encoding}, which this client does not know; upgrade it")
    data = bytearray().join(e.packed for e in embeddings)  # writable, so the array is too
    if len(data) != len(embeddings) * width * dtype.itemsize:
        raise ValueError(f"malformed response: {len(data)} packed bytes for {len(embeddings)} vectors of "
                         f"{width} x {dtype.name}")
    return np.frombuffer(data, dtype).astype(dtype.newbyteorder("="), copy=False).reshape(len(embeddings), width)


@dataclass(frozen=True)
class ServerInfo:
    model_id: str
    variant: str
    variant_reason: str
    device: str
    dimensions: int
    min_dimensions: int
    max_input_tokens: int
    weight_bytes: int
    task_prefixes: bool
    max_texts_per_request: int
    max_batch_tokens: int = 0
    pooling: str = ""
    server_version: str = ""
    weights_digest: str = ""
    model_digest: str = ""

    @classmethod
    def from_pb(cls, r: pb.InfoResponse) -> ServerInfo:
        return cls(
            model_id=r.model_id, variant=r.variant, variant_reason=r.variant_reason, device=r.device,
            dimensions=r.dimensions, min_dimensions=r.min_dimensions, max_input_tokens=r.max_input_tokens,
            weight_bytes=r.weight_bytes, task_prefixes=r.task_prefixes,
            max_texts_per_request=r.limits.max_texts_per_request, max_batch_tokens=r.limits.max_batch_tokens,
            pooling=r.pooling, server_version=r.server_version, weights_digest=r.weights_digest,
            model_digest=r.model_digest,
        )


# What computed a vector: (model_id, variant, weights_digest, model_digest); a digest is "" from servers that do
# not say (older ones give no model digest).
Model = tuple[str, str, str, str]


@dataclass(frozen=True)
class EmbeddedBatch:
    """One batch of a stream: texts[start : start + len(texts)] of the input and their embeddings.

    From a text file, blank lines are skipped, so `start` counts texts, not lines: `line_numbers` gives the
    1-based line of the file each text came from (None for other inputs).
    """

    start: int
    texts: list[str]
    embeddings: np.ndarray  # (len(texts), width), dtype of the encoding
    tokens: list[int]  # tokens read per text
    line_numbers: list[int] | None = None
    model_id: str = ""  # the model and variant that computed the batch (the same for every batch of a stream)
    variant: str = ""
    weights_digest: str = ""  # and its weights ("" from a server that does not say)
    model_digest: str = ""  # and all else that decided the vectors ("" from a server that does not say)

    @property
    def model(self) -> Model:
        """What computed the batch."""
        return self.model_id, self.variant, self.weights_digest, self.model_digest

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)
