"""Client throughput: embed_stream at several window sizes against sequential unary calls of the same batch size.

Run: .venv/bin/python -m scripts.bench_stream [--model tiny|full|DIR] [--texts 4000] [--batch-size 32]

The server runs in its own process on loopback (a random-weight NomicBERT checkpoint in the hub layout:
`tiny` is the test model, `full` has nomic-embed-text-v1.5's sizes); the client runs here. Every mode
embeds the same texts once for warm-up, then is timed in turn, all in one run.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from client import EmbedClient, EmbedError
from tools.checkpoint import TINY, write_tiny_nomic
from tools.servers import free_port

FULL = {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072, "max_trained_positions": 2048}
WORDS = ["embedding", "servers", "batch", "many", "short", "texts", "into", "efficient", "model", "calls", "while",
         "clients", "keep", "requests", "in", "flight", "so", "that", "neither", "side", "waits", "on", "the", "other"]


def texts_of(n: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(6 + i % 9)) for i in range(n)]


def start_server(model: str, port: int, threads: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1",
                               "--port", str(port), "--threads", str(threads), "--log-level", "WARNING"])
    with EmbedClient(f"127.0.0.1:{port}", timeout=5) as client:
        for _ in range(600):
            try:
                client.info()
                return server
            except EmbedError:
                if server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
    raise SystemExit("the server was not ready within 5 minutes")


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all its threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, full, or a checkpoint directory")
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--windows", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="server threads; 0 = all cores")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model in ("tiny", "full"):
            model = str(write_tiny_nomic(Path(tmp), config_style="original", **(TINY if model == "tiny" else FULL)))
        port = free_port()
        server = start_server(model, port, args.threads)
        try:
            bench(f"127.0.0.1:{port}", texts_of(args.texts), args.batch_size,
                  [int(w) for w in args.windows.split(",")], args.model, args.rounds)
        finally:
            server.terminate()
            server.wait(60)


def bench(target: str, texts: list[str], batch: int, windows: list[int], model: str, rounds: int) -> None:
    with EmbedClient(target, timeout=600) as client:
        chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
        tokens = sum(len(t) for t in client.tokenize(texts[:2000])) * len(texts) / min(len(texts), 2000)

        def unary() -> None:
            for chunk in chunks:
                client.embed(chunk)

        def stream(window: int) -> None:
            for _ in client.embed_stream(texts, batch_size=batch, window=window):
                pass

        modes: dict[str, Callable[[], None]] = {"unary, sequential": unary}
        modes.update({f"embed_stream, window {w}": functools.partial(stream, w) for w in windows})
        unary()  # warm-up
        # Rounds interleave the modes so that a busy moment of a shared machine does not hit one mode only.
        best: dict[str, tuple[float, float]] = {}
        for _ in range(rounds):
            for mode, run in modes.items():
                wall, cpu = timed(run)
                best[mode] = min(best.get(mode, (wall, cpu)), (wall, cpu))
    base = best["unary, sequential"][0]
    print(f"model {model}: {len(texts):,} texts (~{tokens / len(texts):.0f} tokens each), {batch} per request, "
          f"best of {rounds} rounds")
    print(f"{'mode':24} {'seconds':>8} {'texts/s':>9} {'tokens/s':>9} {'x unary':>8} {'client CPU ms/1k texts':>23}")
    for mode, (wall, cpu) in best.items():
        print(f"{mode:24} {wall:>8.2f} {len(texts) / wall:>9,.0f} {tokens / wall:>9,.0f} {base / wall:>8.2f} "
              f"{cpu / len(texts) * 1e6:>23.0f}")


if __name__ == "__main__":
    main()
