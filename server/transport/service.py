"""The gRPC transport: protobuf <-> domain, domain errors -> status codes. No torch here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf import duration_pb2, message_factory

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.domain import EmbedResult, Limits, ModelFacts
from server.engine import batch_dependence
from server.engine.embedder import Embedder
from server.errors import EmbedError, InvalidInput, Overloaded, Unavailable
from server.transport import status, trailers, wire
from server.transport.encoding import Encoding, pack_rows
from server.transport.request_ids import add_trailers
from server.transport.requests import (
    ENCODINGS,
    Unparsed,
    lenient_parser,
    parse_embed_request,
    parse_encoding,
    parse_tokenize_request,
)

log = logging.getLogger(__name__)

STREAM_WINDOW = 8  # requests of one stream computed at once; more wait unread (HTTP/2 flow control)


@dataclass(frozen=True)
class ServedModel:
    """How the model is served, beside what it is (`facts`); fixed once the model is loaded."""

    facts: ModelFacts
    variant: str
    variant_reason: str
    device: str
    weight_bytes: int
    server_version: str
    weights_digest: str = ""  # of the checkpoint's weight files (server.model.integrity.check_weights)
    model_digest: str = ""  # of all that decides the vectors (server.model.fingerprint)


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class EmbedService(embed_pb2_grpc.EmbedServiceServicer):
    """Answers UNAVAILABLE until `attach` hands it a loaded model."""

    def __init__(self) -> None:
        self._ready: tuple[Embedder, ServedModel, Limits] | None = None
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """Shutting down: streams stop reading, answer what they hold, then end UNAVAILABLE, so their
        clients reopen elsewhere rather than hold the shutdown for its whole grace period."""
        self._draining.set()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register as the generated add_EmbedServiceServicer_to_server does, but with lenient request
        deserializers: a message protobuf refuses (text that is not UTF-8) reaches the handler as an Unparsed
        and gets INVALID_ARGUMENT naming the field, counted and logged like any call. A raising deserializer
        would end the call UNKNOWN before any interceptor ran, and end a whole stream."""
        service = pb.DESCRIPTOR.services_by_name["EmbedService"]
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            assert method.client_streaming == method.server_streaming, f"{method.name}: unsupported kind"
            make = grpc.stream_stream_rpc_method_handler if method.client_streaming \
                else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(
                getattr(self, method.name),
                request_deserializer=lenient_parser(message_factory.GetMessageClass(method.input_type)),
                response_serializer=wire.serializer(message_factory.GetMessageClass(method.output_type)),
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        server.add_registered_method_handlers(service.full_name, handlers)

    def attach(self, embedder: Embedder, model: ServedModel, limits: Limits) -> None:
        self._ready = (embedder, model, limits)

    def _state(self) -> tuple[Embedder, ServedModel, Limits]:
        if self._ready is None:
            raise Unavailable("the model is still loading; watch the health service for SERVING")
        return self._ready

    async def Embed(self, request: pb.EmbedRequest | Unparsed, context: grpc.aio.ServicerContext) -> bytes:
        started = time.monotonic()  # for failures only: an answer reports the embedder's own timings
        try:
            response, result = await self._embed(request, _deadline(context), context.peer())
        except Exception as error:
            if not isinstance(error, EmbedError):  # a bug must still answer the caller, with what went wrong
                log.exception("Embed failed")
            add_trailers(context, trailers.elapsed_trailers(time.monotonic() - started))
            await status.abort(context, error)
            raise AssertionError("unreachable") from None
        add_trailers(context, trailers.result_trailers(result))
        return response

    async def _embed(self, request: pb.EmbedRequest | Unparsed, deadline: float | None,
                     caller: str) -> tuple[bytes, EmbedResult]:
        """The EmbedResponse, in wire format, and the result it carries. `caller` is the connection's peer:
        connections take turns in the queue."""
        if isinstance(request, Unparsed):
            raise request.error
        embedder, model, limits = self._state()
        texts, options = parse_embed_request(request, limits, model.facts)
        encoding = parse_encoding(request.encoding)
        result = await embedder.embed(texts, options, deadline, caller)
        return _response(model, result, options.dimensions, encoding), result

    async def EmbedStream(self, request_iterator: AsyncIterator[pb.EmbedStreamRequest | Unparsed],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        started, tokens = time.monotonic(), 0
        deadline, caller = _deadline(context), context.peer()
        window: asyncio.Queue[asyncio.Task[tuple[bytes, int]] | None] = asyncio.Queue(STREAM_WINDOW)

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await window.put(asyncio.ensure_future(self._stream_one(message, deadline, caller)))
            finally:
                await window.put(None)

        reader = asyncio.ensure_future(read())
        draining = asyncio.ensure_future(self._draining.wait())
        draining.add_done_callback(lambda _: reader.cancel())  # stop reading; answer what was read
        try:
            while (task := await window.get()) is not None:
                reply, answered = await task
                tokens += answered
                yield reply
            try:
                await reader  # re-raises a broken request stream
            except asyncio.CancelledError:
                if not self._draining.is_set():
                    raise
            if self._draining.is_set():
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "the server is shutting down; messages not answered were not read")
        finally:
            add_trailers(context, trailers.elapsed_trailers(time.monotonic() - started, tokens))
            draining.cancel()
            reader.cancel()
            while not window.empty():
                if (task := window.get_nowait()) is not None:
                    task.cancel()

    async def _stream_one(self, message: pb.EmbedStreamRequest | Unparsed, deadline: float | None,
                          caller: str) -> tuple[bytes, int]:
        """The message's EmbedStreamResponse in wire format, and the tokens it read (0 for an error)."""
        try:
            if isinstance(message, Unparsed):
                raise message.error
            if not message.HasField("request"):
                raise InvalidInput("request", "each stream message needs a request")
            response, result = await self._embed(message.request, deadline, caller)
            return wire.stream_response(message.id, response), result.total_tokens
        except Exception as error:
            if not isinstance(error, EmbedError):
                log.exception("EmbedStream message %r failed", message.id)
            return pb.EmbedStreamResponse(id=message.id, error=pb.StreamError(
                code=status.status_code(error).value[0], message=status.message(error),
                field=error.field if isinstance(error, InvalidInput) else "",
                retry_delay=_duration(error.retry_after_s) if isinstance(error, Overloaded) else None,
            )).SerializeToString(), 0

    async def Info(self, request: pb.InfoRequest | Unparsed, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            if isinstance(request, Unparsed):
                raise request.error
            _, m, lim = self._state()
        except EmbedError as error:
            await status.abort(context, error)
            raise AssertionError("unreachable") from None
        f = m.facts
        return pb.InfoResponse(
            model_id=f.model_id, variant=m.variant, variant_reason=m.variant_reason, device=m.device,
            dimensions=f.hidden_size, min_dimensions=f.min_dimensions, max_input_tokens=lim.max_input_tokens,
            weight_bytes=m.weight_bytes, task_prefixes=f.task_prefixes, pooling=f.pooling,
            server_version=m.server_version, revision=f.revision, trained_positions=f.trained_positions,
            batch_dependence=batch_dependence.describe(m.variant, m.device), weights_digest=m.weights_digest,
            model_digest=m.model_digest,
            limits=pb.Limits(
                max_texts_per_request=lim.max_texts_per_request, max_input_tokens=lim.max_input_tokens,
                max_batch_tokens=lim.max_batch_tokens, max_batch_rows=lim.max_batch_rows,
                max_text_chars=lim.max_text_chars, max_request_tokens=lim.max_request_tokens,
                max_request_bytes=lim.max_request_bytes, max_queue_tokens=lim.max_queue_tokens,
            ),
        )

    async def Tokenize(self, request: pb.TokenizeRequest | Unparsed,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            if isinstance(request, Unparsed):
                raise request.error
            embedder, _, limits = self._state()
            texts, task = parse_tokenize_request(request, limits)
            ids = await embedder.token_ids(texts, task)
        except EmbedError as error:
            await status.abort(context, error)
            raise AssertionError("unreachable") from None
        return pb.TokenizeResponse(texts=[pb.TokenizedText(token_count=len(i), ids=i) for i in ids])


_PB_ENCODINGS = {encoding: value for value, encoding in ENCODINGS.items()}


def _response(model: ServedModel, result: EmbedResult, dimensions: int,
              encoding: Encoding = Encoding.VALUES) -> bytes:
    """The EmbedResponse in wire format: every vector encoded in one numpy pass (VALUES as float32 bytes)."""
    t = result.timings
    packed = encoding is not Encoding.VALUES
    rows = pack_rows(np.stack([e.vector for e in result.embeddings]), encoding if packed else Encoding.FLOAT32)
    embeddings = [wire.embedding(row, packed=packed, tokens=e.tokens, truncated=e.truncated, windows=e.windows)
                  for e, row in zip(result.embeddings, rows, strict=True)]
    return wire.embed_response(embeddings, pb.ResponseMetadata(
        model_id=model.facts.model_id, variant=model.variant, dimensions=dimensions,
        total_tokens=result.total_tokens, queue_time=_duration(t.queue_s),
        inference_time=_duration(t.inference_s), total_time=_duration(t.total_s),
        encoding=_PB_ENCODINGS[encoding], weights_digest=model.weights_digest, model_digest=model.model_digest,
    ))
