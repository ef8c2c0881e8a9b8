"""How far a text's vector moves with what it is computed with, per variant, through a real server.

For each target text: its vector alone, in one request among other texts, and in a stream whose messages the
server batches together. Prints the largest component difference to the vector alone and the lowest cosine.

    .venv/bin/python -m scripts.batch_invariance                       # tiny model, every CPU variant
    .venv/bin/python -m scripts.batch_invariance --full-size --variants fp32,bf16,int8-dynamic
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from quant.variants import VARIANTS
from server.engine.tokenization import TextTokenizer
from server.model.device import probe_device, speed_flags
from server.model.tokenizer import load_tokenizer
from tools.checkpoint import write_tiny_nomic
from tools.quality import stdlib_texts
from tools.servers import running_server

TINY = {"hidden": 128, "layers": 2, "heads": 4, "inner": 256, "max_trained_positions": 16}


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def measure(model: str, variant: str, threads: int, targets: list[str], others: list[str]) -> dict[str, float]:
    with running_server(model, variant=variant, threads=threads) as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())

        def embed(texts: list[str]) -> np.ndarray:
            return _vectors(stub.Embed(pb.EmbedRequest(texts=texts, task=pb.TASK_SEARCH_DOCUMENT), timeout=600))

        alone = np.concatenate([embed([t]) for t in targets])
        again = np.concatenate([embed([t]) for t in targets])
        half = len(others) // 2
        batched = np.concatenate([embed([*others[:half], t, *others[half:]])[half : half + 1] for t in targets])
        # One stream: each target travels in a message of its own between messages of other texts; the server
        # computes up to 8 messages of a stream at once, so they share batches.
        messages = [pb.EmbedStreamRequest(id=f"o{i}", request=pb.EmbedRequest(
            texts=others[i : i + 2], task=pb.TASK_SEARCH_DOCUMENT)) for i in range(0, len(others), 2)]
        for i, t in enumerate(targets):
            messages.insert(2 * i + 1, pb.EmbedStreamRequest(id=f"t{i}", request=pb.EmbedRequest(
                texts=[t], task=pb.TASK_SEARCH_DOCUMENT)))
        replies = {r.id: r for r in stub.EmbedStream(iter(messages), timeout=600)}
        streamed = np.concatenate([_vectors(replies[f"t{i}"].response) for i in range(len(targets))])

        def worst(x: np.ndarray) -> tuple[float, float]:
            return float(np.abs(x - alone).max()), float(np.min(np.sum(x * alone, axis=1)))

        return {"repeat": worst(again)[0], "batched": worst(batched)[0], "streamed": worst(streamed)[0],
                "min_cos": min(worst(batched)[1], worst(streamed)[1])}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.batch_invariance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full-size", action="store_true", help="a random NomicBERT of the real model's shape")
    p.add_argument("--variants", default=",".join(n for n, v in VARIANTS.items() if "cpu" in v.devices))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    shape = {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072, "max_trained_positions": 2048} \
        if args.full_size else TINY
    texts = stdlib_texts(120)
    # Targets from a few tokens to about a thousand; companions of mixed lengths.
    targets = ["What is a cat?", "sort a list", texts[0], " ".join(texts[1:8]), " ".join(texts[8:60])]
    others = [*texts[60:72], "a b", " ".join(texts[72:120])]
    device = probe_device("cpu")
    print(f"{platform.processor() or platform.machine()}; flags {speed_flags()}; native bf16: {device.native_bf16}; "
          f"model {shape}")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_nomic(Path(tmp) / "model", **shape))
        tokenizer = TextTokenizer(*load_tokenizer(Path(model)))
        print("target tokens:", [len(ids) for ids in tokenizer.content_ids(targets, "search_document: ")],
              "companions:", [len(ids) for ids in tokenizer.content_ids(others, "search_document: ")])
        print(f"{'variant':14} {'repeat':>9} {'batched':>9} {'streamed':>9} {'min cos':>10}")
        for variant in args.variants.split(","):
            r = measure(model, variant, args.threads, targets, others)
            print(f"{variant:14} {r['repeat']:9.2e} {r['batched']:9.2e} {r['streamed']:9.2e} "
                  f"{r['min_cos']:10.7f}", flush=True)


if __name__ == "__main__":
    main()
