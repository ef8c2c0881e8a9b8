"""atheris target: any bytes a client may send either fail to decode, or validate to options, or are
refused with InvalidInput naming a request field. Any other exception is a crash.

Run: python -m tests.fuzz.fuzz_validation -runs=100000 -max_total_time=20
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from google.protobuf.message import DecodeError

    from nomic_embed.v1 import embed_pb2 as pb
    from server.domain import Limits, ModelFacts
    from server.errors import InvalidInput
    from server.transport.requests import parse_embed_request, parse_encoding

LIMITS = Limits(max_texts_per_request=16, max_input_tokens=8192, max_text_chars=10_000, max_batch_tokens=16384,
                max_batch_rows=128, max_queue_tokens=100_000)
BOUNDS = ModelFacts(model_id="m", revision="", hidden_size=768, num_layers=12, max_input_tokens=8192,
                    trained_positions=2048, pooling="mean", nomic=True)
FIELDS = {"texts", "task", "dimensions", "long_text_mode", "max_tokens", "encoding"}


def check(data: bytes) -> None:
    request = pb.EmbedRequest()
    try:
        request.ParseFromString(data)
    except DecodeError:
        return
    try:
        texts, options = parse_embed_request(request, LIMITS, BOUNDS)
        parse_encoding(request.encoding)
    except InvalidInput as error:
        if error.field.split("[")[0] not in FIELDS:
            raise AssertionError(f"unknown field in {error}") from None
        return
    assert 1 <= len(texts) <= LIMITS.max_texts_per_request
    assert all(t.strip() and len(t) <= LIMITS.max_text_chars for t in texts)
    assert BOUNDS.min_dimensions <= options.dimensions <= BOUNDS.hidden_size
    assert 16 <= options.max_tokens <= LIMITS.max_input_tokens


def main() -> None:
    seed = pb.EmbedRequest(texts=["hello", "world"], task=pb.TASK_SEARCH_QUERY, dimensions=256).SerializeToString()
    atheris.Setup([sys.argv[0], *sys.argv[1:]], check)
    check(seed)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
