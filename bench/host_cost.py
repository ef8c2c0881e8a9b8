"""Host cost: the server's CPU per one-text request with a model that costs next to nothing.

On a GPU the model's time per token is small and the host's Python per request sets the ceiling, so this
is measured on its own, on any machine: a 1-layer, 64-wide NomicBERT (hub layout, random weights), the
server in processes of its own, load from another process (64 callers, one short text per request), and
the CPU time of every server process summed from /proc. A bare grpc.aio EmbedService answering a fixed
vector (bench.echo) runs the same load beside it: the floor that gRPC itself sets on this host.

`python -m bench.host_cost` prints both; `make bench` includes it. `--ladder` also measures the echo's other
levels (bench.echo), from gRPC alone up to a batching thread that runs the same model's forward: what each
part of the server's structure costs, and what is left for the server's own handling of a call.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import grpc

from bench.load import drive_from_another_process
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.event_loop import CHOICES, resolved
from server.model.device import speed_flags
from tools.checkpoint import write_tiny_nomic
from tools.ports import free_port
from tools.servers import wait_until_serving

CONCURRENCY = 64
SERVER, ECHO = "server", "bare grpc.aio echo"
# bench.echo's levels, as the report names them
LADDER = {"echo": ECHO, "queue": "echo + batching thread", "tokenize": "echo + batching thread + tokenizer",
          "forward": "echo + batching thread + tokenizer + forward"}
NEAR_FREE = {"hidden": 64, "layers": 1, "heads": 2, "inner": 128, "max_trained_positions": 2048}
_SENTENCE = ("how do I read a large file line by line and strip the trailing newline characters from "
             "each one without loading everything")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class HostCost:
    name: str
    requests: int
    errors: int
    cpu_s: float  # all of the server's processes together
    wall_s: float
    processes: int
    event_loop: str = "asyncio"

    @property
    def cpu_us_per_request(self) -> float:
        return 1e6 * self.cpu_s / max(self.requests, 1)

    @property
    def requests_s(self) -> float:
        return self.requests / self.wall_s


FIELDS = frozenset(f.name for f in fields(HostCost))


def short_texts(count: int) -> list[str]:
    """Distinct one-line texts of 8 to 16 words (about 12 to 22 tokens with the task prefix)."""
    words = _SENTENCE.split()
    return [" ".join(words[i % 5 : i % 5 + 8 + i % 9]) + f" {i}" for i in range(count)]


def tree_cpu_s(root: int) -> tuple[float, int]:
    """User + system CPU seconds of `root` and every process below it, and how many processes that is."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree), len(tree & times.keys())


def measure(name: str, pid: int, target: str, concurrency: int, requests: int, warm_up: int = 200,
            event_loop: str = "auto", channels: int = 1) -> HostCost:
    texts = short_texts(requests)
    drive_from_another_process(target, "unary", concurrency, [[t] for t in texts[:warm_up]], channels)
    before, _ = tree_cpu_s(pid)
    load = drive_from_another_process(target, "unary", concurrency, [[t] for t in texts], channels)
    after, processes = tree_cpu_s(pid)
    return HostCost(name, len(load.latencies_s), len(load.errors), after - before, load.wall_s, processes,
                    resolved(event_loop))


@contextmanager
def _process(argv: list[str], ready: Callable[[subprocess.Popen[bytes]], None]) -> Iterator[int]:
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                ready(process)
            except Exception:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])
                raise
            yield process.pid
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _echo_ready(target: str) -> Callable[[subprocess.Popen[bytes]], None]:
    def ready(process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(target) as channel:
            stub = embed_pb2_grpc.EmbedServiceStub(channel)
            while True:
                try:
                    stub.Embed(pb.EmbedRequest(texts=["x"]), timeout=2)
                    return
                except grpc.RpcError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the echo server did not start") from None
                    time.sleep(0.2)
    return ready


def run(concurrency: int, requests: int, server_args: list[str], event_loop: str = "auto",
        levels: Sequence[str] = ("echo",), channels: int = 1) -> list[HostCost]:
    """The echo at each of `levels` (bench.echo.LEVELS), then the server, under the same load (its callers
    over `channels` connections)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_nomic(Path(tmp) / "near-free", config_style="v5", **NEAR_FREE)
        for level in levels:
            port = free_port()
            target = f"127.0.0.1:{port}"
            argv = [sys.executable, "-m", "bench.echo", "--port", str(port), "--width", str(NEAR_FREE["hidden"]),
                    "--event-loop", event_loop, "--level", level, "--model", str(model)]
            with _process(argv, _echo_ready(target)) as pid:
                results.append(measure(LADDER[level], pid, target, concurrency, requests, event_loop=event_loop,
                                       channels=channels))
        port = free_port()
        target = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                "--variant", "fp32", "--log-level", "WARNING", "--event-loop", event_loop, *server_args]
        with _process(argv, lambda p: wait_until_serving(target, lambda: p.poll() is None)) as pid:
            results.append(measure(SERVER, pid, target, concurrency, requests, event_loop=event_loop,
                                   channels=channels))
    return results


def report(results: list[HostCost], concurrency: int) -> str:
    lines = [f"host cost, near-free model (1 layer, 64 wide), {concurrency} callers, one text per request:"]
    for r in results:
        lines.append(f"  {r.name}: {r.cpu_us_per_request:,.0f} us CPU per request over {r.processes} process(es), "
                     f"{r.requests_s:,.0f} req/s ({r.requests} requests, {r.errors} errors; {r.event_loop})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    p = argparse.ArgumentParser(prog="python -m bench.host_cost", description=__doc__.split("\n")[0])
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--server-args", default="", help='more server flags, e.g. "--metrics-port 9100"')
    p.add_argument("--event-loop", choices=CHOICES, default="auto", help="for the server and the echo alike")
    p.add_argument("--ladder", action="store_true", help="every level of the echo (bench.echo), not only the bare one")
    p.add_argument("--channels", type=int, default=1,
                   help="connections the callers take turns over (a server with --workers spreads connections)")
    args = p.parse_args(argv)
    results = run(args.concurrency, args.requests, shlex.split(args.server_args), args.event_loop,
                  tuple(LADDER) if args.ladder else ("echo",), args.channels)
    print(f"CPU flags: {speed_flags()}")
    print(report(results, args.concurrency))
    return [as_dict(r) for r in results]


def as_dict(cost: HostCost) -> dict[str, object]:
    return {**asdict(cost), "cpu_us_per_request": cost.cpu_us_per_request, "requests_s": cost.requests_s}


if __name__ == "__main__":
    main()
