"""Defences against answers that would give wrong vectors: a response whose count or width is not the one
asked for, and a stream whose server changed its model mid-run."""

from __future__ import annotations

import grpc
import numpy as np

from client.errors import EmbedError
from client.options import EmbedOptions
from client.results import Model, decode_embeddings, row_width
from nomic_embed.v1 import embed_pb2 as pb


def check_response(response: pb.EmbedResponse, texts: int, options: EmbedOptions) -> pb.EmbedResponse:
    """The response, once it has one vector per text, each of the width asked for (DATA_LOSS otherwise)."""
    got = len(response.embeddings)
    if got != texts:
        raise EmbedError(grpc.StatusCode.DATA_LOSS, f"the server answered {got} vectors for {texts} texts; "
                                                    "the vectors cannot be matched to their texts")
    width = response.metadata.dimensions
    if options.dimensions and width != options.dimensions:
        raise EmbedError(grpc.StatusCode.DATA_LOSS, f"the server answered vectors of width {width} where "
                                                    f"{options.dimensions} were asked for")
    if response.metadata.encoding == pb.ENCODING_UNSPECIFIED:
        for i, embedding in enumerate(response.embeddings):
            if len(embedding.values) != width:
                raise EmbedError(grpc.StatusCode.DATA_LOSS, f"the server answered a vector of width "
                                                            f"{len(embedding.values)} for text {i}, where the "
                                                            f"response says {width}")
    return response


def checked_embeddings(response: pb.EmbedResponse, texts: int, options: EmbedOptions) -> np.ndarray:
    """decode_embeddings of a response that passed check_response; a malformed packing is DATA_LOSS too."""
    check_response(response, texts, options)
    try:
        vectors = decode_embeddings(response)
    except ValueError as exc:
        raise EmbedError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
    want = row_width(response.metadata.encoding, response.metadata.dimensions)
    if vectors.shape != (texts, want):
        raise EmbedError(grpc.StatusCode.DATA_LOSS, f"the server answered vectors of shape {vectors.shape[1:]} "
                                                    f"for {texts} texts of width {want}")
    if vectors.dtype.kind == "f" and not (finite := np.isfinite(vectors).all(axis=1)).all():
        raise EmbedError(grpc.StatusCode.DATA_LOSS, f"the server answered a vector with NaN or infinity for text "
                                                    f"{int(np.flatnonzero(~finite)[0])}")
    return vectors


_DIGESTS = ("weights", "model")


def served_model(response: pb.EmbedResponse) -> Model:
    m = response.metadata
    return m.model_id, m.variant, m.weights_digest, m.model_digest


def same_model(a: Model, b: Model) -> bool:
    """Whether vectors of `a` and `b` are comparable: one variant, and one digest of each kind where both say;
    one model id too, unless both say their model digest (replicas may name the same files by other paths)."""
    by_digest = bool(a[3] and b[3])
    return ((by_digest or a[0] == b[0]) and a[1] == b[1]
            and all(x == y or "" in (x, y) for x, y in zip(a[2:], b[2:], strict=True)))


def held_to(held: Model | None, answered: Model) -> Model:
    """What a run holds to once `answered` (comparable to `held`) came: the first answer's model, with the
    first digest of each kind any answer gave."""
    if held is None:
        return answered
    return held[0], held[1], held[2] or answered[2], held[3] or answered[3]


def describe_model(model: Model) -> str:
    digests = "".join(f", {kind} {digest}" for kind, digest in zip(_DIGESTS, model[2:], strict=True) if digest)
    return f"{model[0]} (variant {model[1]}{digests})"


class ModelGuard:
    """Remembers the model, variant and weights of a run's first answer and refuses any later answer computed
    otherwise: vectors of two models, or of two sets of weights at one path, are not comparable."""

    def __init__(self) -> None:
        self.model: Model | None = None
        self.width: int | None = None  # of the first answer: the run's rows are all of it

    def check(self, response: pb.EmbedResponse) -> None:
        model = served_model(response)
        if self.model is not None and not same_model(model, self.model):
            raise EmbedError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"the server's model changed from {describe_model(self.model)} to "
                             f"{describe_model(model)} mid-run; the vectors would not be comparable")
        width = response.metadata.dimensions
        if self.width is not None and width != self.width:  # e.g. dimensions=0 (the full width), asked of each
            raise EmbedError(grpc.StatusCode.DATA_LOSS, f"the server answered vectors of width {width} where the "
                                                        f"run's first answer had {self.width}")
        self.model = held_to(self.model, model)
        self.width = width
