"""Bytes and CPU time per 10,000 vectors for each response encoding, against `repeated float` values.

Run: .venv/bin/python -m scripts.bench_encoding [--dims 768] [--batch 64]

Server side: writing the EmbedResponse in wire format (service._response); client side: parsing it and
decoding to numpy (client.results.decode_embeddings). No model and no network: only the encoding work,
measured on random unit vectors, best of --repeats runs, in one process, side by side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from client.results import decode_embeddings
from nomic_embed.v1 import embed_pb2 as pb
from server.domain import Embedding, EmbedResult, ModelFacts, Timings
from server.transport.encoding import INT8_SCALE, Encoding
from server.transport.service import ServedModel, _response

MODEL = ServedModel(ModelFacts(model_id="nomic-ai/nomic-embed-text-v1.5", revision="", hidden_size=768,
                               num_layers=12, max_input_tokens=8192, trained_positions=2048, pooling="mean",
                               nomic=True),
                    variant="fp32", variant_reason="", device="cpu", weight_bytes=0, server_version="bench")


def unit_vectors(n: int, dims: int) -> np.ndarray:
    v = np.random.default_rng(0).standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def requests_of(vectors: np.ndarray, batch: int) -> list[EmbedResult]:
    timings = Timings(0.001, 0.002, 0.003)
    return [EmbedResult([Embedding(v, tokens=12, truncated=False, windows=1) for v in vectors[i : i + batch]],
                        timings) for i in range(0, len(vectors), batch)]


def measure(results: list[EmbedResult], dims: int, encoding: Encoding, repeats: int) -> dict[str, float]:
    server_s = client_s = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        wire = [_response(MODEL, r, dims, encoding) for r in results]
        server_s = min(server_s, time.process_time() - started)
        started = time.process_time()
        decoded = [decode_embeddings(pb.EmbedResponse.FromString(w)) for w in wire]
        client_s = min(client_s, time.process_time() - started)
    return {"bytes": sum(len(w) for w in wire), "server_s": server_s, "client_s": client_s,
            "decoded": np.concatenate(decoded)}  # type: ignore[dict-item]


def fidelity(vectors: np.ndarray, decoded: np.ndarray, encoding: Encoding) -> str:
    if encoding is Encoding.UBINARY:
        bits = np.unpackbits(decoded, axis=1, count=vectors.shape[1])
        return f"sign bits, {np.mean(bits == (vectors > 0)):.0%} agree"
    restored = decoded.astype(np.float32) / (INT8_SCALE if encoding is Encoding.INT8 else 1.0)
    cosine = np.sum(restored * vectors, axis=1) / np.linalg.norm(restored, axis=1)
    return f"max |err| {np.abs(restored - vectors).max():.1e}, min cos {cosine.min():.5f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--batch", type=int, default=64, help="vectors per response")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    vectors = unit_vectors(args.vectors, args.dims)
    results = requests_of(vectors, args.batch)
    rows = {e: measure(results, args.dims, e, args.repeats) for e in Encoding}
    base = rows[Encoding.VALUES]
    scale = 10_000 / args.vectors
    print(f"{args.vectors:,} unit vectors of {args.dims} dims, {args.batch} per response; per 10,000 vectors:")
    print(f"{'encoding':9} {'bytes':>11} {'x values':>8} {'server ms':>9} {'x':>6} {'client ms':>9} {'x':>6}  fidelity")
    for encoding, r in rows.items():
        print(f"{encoding.value:9} {r['bytes'] * scale:>11,.0f} {r['bytes'] / base['bytes']:>8.3f} "
              f"{r['server_s'] * scale * 1e3:>9.1f} {r['server_s'] / base['server_s']:>6.2f} "
              f"{r['client_s'] * scale * 1e3:>9.1f} {r['client_s'] / base['client_s']:>6.2f}  "
              + ("exact" if encoding in (Encoding.VALUES, Encoding.FLOAT32) and np.array_equal(r["decoded"], vectors)
                 else fidelity(vectors, r["decoded"], encoding)))


if __name__ == "__main__":
    main()
