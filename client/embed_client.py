"""A small typed client over the generated stubs."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc


class Task(enum.IntEnum):
    SEARCH_DOCUMENT = pb.TASK_SEARCH_DOCUMENT
    SEARCH_QUERY = pb.TASK_SEARCH_QUERY
    CLUSTERING = pb.TASK_CLUSTERING
    CLASSIFICATION = pb.TASK_CLASSIFICATION
    RAW = pb.TASK_RAW


class LongTextMode(enum.IntEnum):
    TRUNCATE = pb.LONG_TEXT_MODE_TRUNCATE
    ERROR = pb.LONG_TEXT_MODE_ERROR
    MEAN = pb.LONG_TEXT_MODE_MEAN


class EmbedError(Exception):
    """A call failed; `code` is the gRPC status code and `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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


def _task(task: Task | str | int) -> int:
    if isinstance(task, str):
        return int(Task[task.upper()])
    return int(task)


class EmbedClient:
    """Blocking client. `EmbedClient("localhost:50051").embed(["text"], Task.SEARCH_QUERY)`."""

    def __init__(self, target: str, *, timeout: float | None = 60.0,
                 channel: grpc.Channel | None = None) -> None:
        self._channel = channel or grpc.insecure_channel(target)
        self._stub = embed_pb2_grpc.EmbedServiceStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise EmbedError(exc.code(), exc.details() or "") from None

    def embed(self, texts: Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT, dimensions: int = 0,
              *, long_text_mode: LongTextMode = LongTextMode.TRUNCATE, max_tokens: int = 0) -> np.ndarray:
        """Embeddings of `texts` as a float32 array of shape (len(texts), dimensions or full width)."""
        return embeddings_array(self.embed_response(texts, task, dimensions, long_text_mode=long_text_mode,
                                                    max_tokens=max_tokens))

    def embed_response(self, texts: Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT,
                       dimensions: int = 0, *, long_text_mode: LongTextMode = LongTextMode.TRUNCATE,
                       max_tokens: int = 0) -> pb.EmbedResponse:
        request = pb.EmbedRequest(texts=list(texts), task=_task(task), dimensions=dimensions,
                                  long_text_mode=int(long_text_mode), max_tokens=max_tokens)
        return self._call(self._stub.Embed, request)

    def tokenize(self, texts: Sequence[str], task: Task | str | int = Task.SEARCH_DOCUMENT) -> list[list[int]]:
        response = self._call(self._stub.Tokenize, pb.TokenizeRequest(texts=list(texts), task=_task(task)))
        return [list(t.ids) for t in response.texts]

    def info(self) -> ServerInfo:
        r = self._call(self._stub.Info, pb.InfoRequest())
        return ServerInfo(
            model_id=r.model_id, variant=r.variant, variant_reason=r.variant_reason, device=r.device,
            dimensions=r.dimensions, min_dimensions=r.min_dimensions, max_input_tokens=r.max_input_tokens,
            weight_bytes=r.weight_bytes, task_prefixes=r.task_prefixes,
            max_texts_per_request=r.limits.max_texts_per_request,
        )


def embeddings_array(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)
