"""python -m loadtest: a concurrency sweep over loopback, then a burst of calls started at once, then one caller
sending short texts alone and beside a flood from another process; printing RPS, p50/p99 and counts per status
code (and RESOURCE_EXHAUSTED answers that carried no RetryInfo: there should be none).

Without --target it starts a server on a generated random checkpoint (original hub layout) and stops it after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.driver import LoadResult, burst, flood_to_file, run_level

ROOT = Path(__file__).resolve().parents[1]
# A small queue, so that the sweep reaches overload; a request may hold no more than the queue.
DEFAULT_SERVER_ARGS = "--max-queue-tokens 4096 --max-request-tokens 4096 --max-input-tokens 512"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a finite number of seconds of at least 0")
    return value


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__)
    p.add_argument("--target", help="host:port of a running server (default: start one)")
    p.add_argument("--model", help="model for the started server (default: a generated random checkpoint)")
    p.add_argument("--hidden", type=int, default=256, help="width of the generated checkpoint")
    p.add_argument("--layers", type=int, default=4, help="layers of the generated checkpoint")
    p.add_argument("--server-args", default=DEFAULT_SERVER_ARGS, help="extra flags for the started server")
    p.add_argument("--concurrency", default="1,8,64,256", help="comma-separated levels")
    p.add_argument("--seconds", type=float, default=8.0, help="duration of each level")
    p.add_argument("--texts-per-request", type=int, default=4)
    p.add_argument("--max-words", type=int, default=40)
    p.add_argument("--deadline-ms", type=float, default=5000)
    p.add_argument("--burst", type=int, default=5000, help="calls started at once after the sweep; 0: none")
    p.add_argument("--burst-channels", type=int, default=1, help="connections the burst is spread over")
    p.add_argument("--burst-deadline-ms", type=float, default=20000,
                   help="deadline of each burst call: the last calls wait for the server to take them from grpc")
    p.add_argument("--flood-seconds", type=_seconds, default=8.0,
                   help="how long one caller sends short texts alone, then beside a flood; 0: no flood phase")
    p.add_argument("--flood-callers", type=_positive, default=32,
                   help="callers of the flood, in another process, on one connection")
    p.add_argument("--flood-texts", type=_positive, default=16, help="texts per request of the flood (up to 40 words)")
    p.add_argument("--output", default="loadtest-results.json")
    return p.parse_args()


def _wait_serving(target: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300) -> None:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise SystemExit(f"the server exited with status {process.returncode}:\n{tail}")
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become SERVING in time")


def _start_server(args: argparse.Namespace, workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    sys.path.insert(0, str(ROOT))  # the repository's test helpers
    from tools.ports import free_port

    model = args.model
    if not model:
        from tools.checkpoint import write_tiny_nomic

        model = str(write_tiny_nomic(workdir / "model", hidden=args.hidden, layers=args.layers, heads=4,
                                     inner=4 * args.hidden, max_trained_positions=2048))
    port = free_port()
    command = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
               *args.server_args.split()]
    log = workdir / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    _wait_serving(target, process, log)
    return target, process


def _print_row(label: str, result: LoadResult | dict[str, object], note: str = "") -> dict[str, object]:
    row = result.row() if isinstance(result, LoadResult) else result
    missing = row["refusals_without_retry_info"]
    print(f"{label:>13} {row['rps_ok']!s:>8} {row['p50_ms']!s:>8} {row['p99_ms']!s:>8}  {row['codes']}"
          + (f"  ({missing} RESOURCE_EXHAUSTED without RetryInfo)" if missing else "") + note)
    return row


POLITE_TEXTS = {"texts_per_request": 1, "max_words": 8}


def _flood_phase(target: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, object]]:
    """One caller sending short texts, alone and then beside a flood on another connection: what the flood
    costs the caller who is not flooding."""
    rows = [{"flood": "none", **_print_row("1 polite", asyncio.run(
        run_level(target, 1, args.flood_seconds, deadline_s=60, seed=3, **POLITE_TEXTS)))}]
    out = workdir / "flood.json"
    flood = multiprocessing.get_context("spawn").Process(
        target=flood_to_file, args=(target, args.flood_callers, args.flood_texts, args.flood_seconds + 2, str(out)))
    flood.start()
    try:
        time.sleep(2)  # the flood fills the queue first
        rows.append({"flood": f"{args.flood_callers} callers", **_print_row("1 polite+flood", asyncio.run(
            run_level(target, 1, args.flood_seconds, deadline_s=60, seed=3, **POLITE_TEXTS)))})
    finally:
        flood.join(args.flood_seconds + 120)
    if flood.exitcode != 0 or not out.exists():
        raise SystemExit(f"the flood's process failed (exit status {flood.exitcode})")
    row = json.loads(out.read_text())
    if not row["codes"].get("OK"):  # e.g. texts the server refuses: no flood reached the model
        raise SystemExit(f"the flood got no answer: {row['codes']}")
    _print_row("flood", row, f"  ({args.flood_callers} callers x {args.flood_texts} texts)")
    rows.append({"flood": f"{args.flood_callers} callers, the flood itself", **row})
    return rows


def main() -> int:
    args = _args()
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        process = None
        target = args.target
        if not target:
            target, process = _start_server(args, Path(tmp))
        try:
            rows: list[dict[str, object]] = []
            texts = {"texts_per_request": args.texts_per_request, "max_words": args.max_words}
            print(f"target {target}; {args.seconds:.0f}s per level; {args.texts_per_request} texts per request")
            print(f"{'load':>13} {'ok rps':>8} {'p50 ms':>8} {'p99 ms':>8}  codes")
            for level in levels:
                result = asyncio.run(run_level(target, level, args.seconds, deadline_s=args.deadline_ms / 1000,
                                               **texts))
                rows.append(_print_row(f"{level} callers", result))
            if args.burst:
                result = asyncio.run(burst(target, args.burst, channels=args.burst_channels,
                                           deadline_s=args.burst_deadline_ms / 1000, **texts))
                rows.append({"burst_channels": args.burst_channels, **_print_row(f"burst {args.burst}", result)})
            if args.flood_seconds:
                rows += _flood_phase(target, args, Path(tmp))
        finally:
            if process:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
    Path(args.output).write_text(json.dumps({"target": target, "cpus": os.cpu_count(), "levels": rows}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
