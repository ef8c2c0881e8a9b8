"""The CUDA check of the variants, run on a CUDA host: `python -m scripts.gpu_check [--model DIR]`.

1. fp32, fp16, bf16, int8 and nf4 on the GPU: cosine to fp32, weight bytes, peak bytes
   (torch.cuda.max_memory_allocated) while running a batch, against quant.memory's estimate, and tok/s.
2. The `auto` choice under several --max-memory caps: the decision, then that variant loaded and run at
   the batch budget the policy derived, with longest-input rows, and its measured peak (allocated bytes,
   so without the CUDA context) against the cap.
3. Real CUDA out-of-memory: a server (fp16) on the GPU, all but a little of the free memory held by
   another allocation, then long texts: batches split and retried (vectors as without the squeeze), a
   text that cannot fit even alone answered RESOURCE_EXHAUSTED, the server still SERVING after.
4. The published revisions on the GPU: full-size random weights with the hub's 2024 and 2026 config.json
   and the real trained length, served as `auto` (fp16 on CUDA) and as fp32, against the float64
   reference of the model card's recipe: every task at 64 and 768 dimensions and a ~3,000-token document.
5. CUDA graphs (`graphs`): full-size fp16 (fp32 on a CPU dry run) with and without graphs on one loaded
   model: capture time and pool against quant.memory's estimate, vectors (graphs against eager, and
   against fp32 eager), wall and CPU time per forward at a few batch shapes.
6. Serving speed (`serve`): `make bench` on the device at the default variant (fp16 on CUDA), full-size
   random weights, stdlib docstrings: one text per request at concurrency 256, unary, then 64 texts per
   message on 4 streams; sentence-transformers at fp32 and around the server's own model in the same runs,
   the idle 16-token query, the served vectors against sentence-transformers fp32; then the host cost.
   Goals: >= 250k tok/s one text per request, >= 600k tok/s batched, >= 2x sentence-transformers at the
   same variant, idle query p50 <= 3 ms.
7. Replicas (`replicas`): whole servers side by side on the device, 1, 2 and 4 of them (`--replicas`), each
   capped to its share of the free memory (--max-memory) and on a port of its own, one text per request at
   a total concurrency of 256 spread evenly over them: tok/s, p50/p99, and the CPU of all of them per
   request. One of the two designs for taking the model off the transport's interpreter lock (several server
   processes per device, against one model process fed by several transport processes), measured before
   either is built: if 2 and 4 replicas serve far more than 1, the transport's lock is what limits the device.
Prints one table per part (`--parts` picks some). Exits with "no CUDA device" where there is none.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from quant.memory import MIB, estimate
from quant.policy import NoVariantFits, Request, choose_variant
from quant.variants import VARIANTS
from server.config import ServerConfig
from server.engine.tokenization import TextTokenizer
from server.model.device import peak_memory, probe_device, reset_peak_memory
from server.model.loader import checkpoint_info
from server.model.spec import read_model_spec
from server.model.tokenizer import load_tokenizer
from tools.checkpoint import write_tiny_nomic
from tools.measure import build, decide, embed_rows, measure, probe_rows
from tools.quality import agreement, stdlib_texts

CAPS_MIB = [None, 4096, 2048, 1536, 1024, 768, 512, 256]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint directory (default: full-size NomicBERT, random)")
    p.add_argument("--texts", type=int, default=300)
    p.add_argument("--max-input", type=int, default=8192, help="longest input for the --max-memory part")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N; cpu for a (slow) dry run of the script")
    p.add_argument("--parts", default="graphs,variants,caps,oom,published,serve,replicas",
                   help="comma-separated parts to run")
    p.add_argument("--serve-texts", type=int, default=8192, help="docstrings per run of the serve part")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants for the variants part")
    p.add_argument("--replicas", default="1,2,4", help="comma-separated server counts for the replicas part")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on a CUDA host (torch sees none here)")
    device = probe_device(args.device)
    print(f"device: {device.describe()}, {device.free_bytes / 2**30:.1f} of {device.total_bytes / 2**30:.1f} GiB "
          f"free; bf16 {'native' if device.native_bf16 else 'emulated'}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model = args.model or _random_nomic(Path(tmp))
        if "graphs" in parts:
            graphs_check(model, device.torch_device, stdlib_texts(args.texts))
        if "variants" in parts:
            variants_table(model, device.kind, device.torch_device, stdlib_texts(args.texts),
                           args.variants.split(","))
        if "caps" in parts:
            caps_table(model, args.device, args.max_input)
        if device.kind == "cuda" and "oom" in parts:
            oom_check(model)
        if "published" in parts:
            published_check(Path(tmp), args.device)
        if "replicas" in parts:
            replicas_check(model, args.device, _docstrings(args.serve_texts),
                           [int(n) for n in args.replicas.split(",")], Path(tmp))
    if "serve" in parts:
        serve_check(args.device, args.serve_texts)


def _random_nomic(where: Path) -> Path:
    return write_tiny_nomic(where / "nomic-768x12", hidden=768, layers=12, heads=12, inner=3072,
                            max_trained_positions=2048, config_style="v5")


def variants_table(model: Path, kind: str, device: str, texts: list[str], names: list[str]) -> None:
    print("\n| variant | mean cos | min cos | top-10 overlap | weights MiB | peak MiB @ 32x512 | estimate MiB (error) "
          "| tok/s | x fp32 |\n|---|---|---|---|---|---|---|---|---|")
    reference: tuple[np.ndarray, float] | None = None
    for variant in (name for name, v in VARIANTS.items() if kind in v.devices and name in names):
        try:
            m, vectors = measure(model, variant, device, texts, batch_rows=32, row_tokens=512,
                                 text_batch_tokens=16384, max_text_tokens=512)
        except Exception as exc:  # report and go on: one broken variant must not hide the others
            print(f"| {variant} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} |")
            continue
        finally:
            _release()
        if reference is None:
            reference = (vectors, m.tokens_per_s)
        q = agreement(vectors, reference[0])
        print(f"| {variant} | {q.mean_cosine:.5f} | {q.min_cosine:.5f} | {q.neighbour_overlap:.3f} "
              f"| {m.weight_bytes / MIB:.1f} | {m.peak_bytes / MIB:.0f} | {m.estimate_bytes / MIB:.0f} "
              f"({m.estimate_error:+.0%}) | {m.tokens_per_s:.0f} | {m.tokens_per_s / reference[1]:.2f} |", flush=True)


def graphs_check(model: Path, device: str, texts: list[str]) -> None:
    from server.model.buckets import Buckets

    kind = torch.device(device).type
    graph_tokens, batch_tokens, longest = ServerConfig().cuda_graph_tokens, 16384, 512
    _, info, fp32 = decide(model, "fp32", device, batch_tokens, longest)
    tokenizer = TextTokenizer(*load_tokenizer(model))
    built = build(model, fp32, device, tokenizer)
    rows = [tokenizer.wrap(ids[: longest - tokenizer.special_tokens])
            for ids in tokenizer.content_ids(texts, "search_document: ")]
    reference, _ = embed_rows(built.runner, rows, batch_tokens)
    del built
    _release()
    _, _, decision = decide(model, "fp16" if kind == "cuda" else "fp32", device, batch_tokens, longest)
    runner = build(model, decision, device, tokenizer).runner
    eager, eager_s = embed_rows(runner, rows, batch_tokens)
    runner.buckets = Buckets(graph_tokens, ServerConfig().max_batch_rows)
    started = time.monotonic()
    if kind == "cuda":
        runner.capture_graphs()
    captured_s = time.monotonic() - started
    graphs, graphs_s = embed_rows(runner, rows, batch_tokens)
    pool = runner.graphs.pool_bytes if runner.graphs else 0
    planned = estimate(decision.variant, info, kind, batch_tokens, longest, graph_tokens).graphs
    tokens = sum(map(len, rows))
    print(f"\n{decision.variant.name}: {len(runner.buckets.all)} buckets up to {graph_tokens} tokens, captured in "
          f"{captured_s:.1f}s; pool {pool / MIB:.0f} MiB, estimate {planned / MIB:.0f} MiB")
    graphs_name = "graphs" if kind == "cuda" else "bucketed (eager: no CUDA)"
    print(f"{len(rows)} texts: eager {tokens / eager_s:,.0f} tok/s, {graphs_name} {tokens / graphs_s:,.0f} tok/s; vs "
          f"eager max abs diff {np.abs(_unit(graphs) - _unit(eager)).max():.2e}; cos to fp32 eager: graphs mean "
          f"{agreement(graphs, reference).mean_cosine:.6f} min {agreement(graphs, reference).min_cosine:.6f}, "
          f"eager mean {agreement(eager, reference).mean_cosine:.6f}")
    print(f"\n| rows x tokens | eager ms (CPU ms) | {graphs_name} ms (CPU ms) |\n|---|---|---|")
    buckets = runner.buckets
    for shape in ((1, 16), (8, 32), (64, 48), (128, 128)) if kind == "cuda" else ((1, 16), (8, 32)):
        batch = probe_rows(tokenizer, *shape)
        timings = []
        for use in (None, buckets):
            runner.buckets = use
            runner.run(batch)
            wall, cpu = [], []
            for _ in range(30):
                w, c = time.perf_counter(), time.process_time()
                runner.run(batch)
                wall.append(time.perf_counter() - w)
                cpu.append(time.process_time() - c)
            timings.append(f"{np.median(wall) * 1e3:.2f} ({np.median(cpu) * 1e3:.2f})")
        print(f"| {shape[0]} x {shape[1]} | {timings[0]} | {timings[1]} |", flush=True)
    del runner
    _release()


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def caps_table(model: Path, requested_device: str, max_input: int) -> None:
    spec = read_model_spec(model)
    info = checkpoint_info(model, spec.config)
    tokenizer = TextTokenizer(*load_tokenizer(model))
    print("\n| --max-memory | choice | batch tokens | estimate MiB | measured peak MiB | within cap |\n"
          "|---|---|---|---|---|---|")
    for cap_mib in CAPS_MIB:
        cap = cap_mib * MIB if cap_mib else None
        device = probe_device(requested_device)  # free memory now, as the server would see it at start
        label = f"{cap_mib} MiB" if cap_mib else "none"
        try:
            request = Request("auto", cap, ServerConfig().max_batch_tokens, longest_row=max_input)
            decision = choose_variant(device, info, request)
        except NoVariantFits as exc:
            print(f"| {label} | refused: {exc} | | | | |", flush=True)
            continue
        before = reset_peak_memory(device.torch_device)
        rows = max(1, decision.batch_tokens // max_input)
        try:
            built = build(model, decision, device.torch_device, tokenizer)
            built.runner.run(probe_rows(tokenizer, rows, max_input))
        except Exception as exc:  # e.g. bitsandbytes missing: report and go on
            print(f"| {label} | {decision.variant.name} failed: {type(exc).__name__}: {str(exc)[:160]} | | | | |")
            continue
        peak = peak_memory(device.torch_device) - before
        del built
        _release()
        within = "yes" if cap is None or peak <= cap else "NO"
        print(f"| {label} | {decision.variant.name} | {decision.batch_tokens} ({rows} x {max_input}) "
              f"| {decision.memory.total / MIB:.0f} | {peak / MIB:.0f} | {within} |", flush=True)


def oom_check(model: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nomic_embed.v1 import embed_pb2 as pb
    from nomic_embed.v1 import embed_pb2_grpc
    from tools.servers import running_server

    print("\n| squeeze | request | outcome | max abs diff | batch splits | budget tokens | seconds |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    docs = [" ".join(t.split()[:60]) for t in stdlib_texts(64)]
    texts = [" ".join([d] * 12) for d in docs]  # ~1,000 tokens each
    giant = "hello " * 7900  # close to the 8,192-token limit
    with running_server(str(model), device="cuda", variant="fp16") as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
        batcher = srv.app.loaded.batcher

        def embed(batch: list[str]) -> tuple[str, np.ndarray | None, float]:
            started = time.monotonic()
            try:
                reply = stub.Embed(pb.EmbedRequest(texts=batch, task=pb.TASK_SEARCH_DOCUMENT),
                                   timeout=300)
            except grpc.RpcError as exc:
                return f"{exc.code().name}: {exc.details()[:140]}", None, time.monotonic() - started
            return "OK", np.array([e.values for e in reply.embeddings]), time.monotonic() - started

        _, expected, _ = embed(texts)
        for headroom_mib, batch, label in ((384, texts, "64 x ~1k tokens"), (96, texts, "64 x ~1k tokens"),
                                           (96, [giant], "1 x ~7.9k tokens"), (16, [giant], "1 x ~7.9k tokens")):
            _release()
            free, _ = torch.cuda.mem_get_info()
            hold = torch.empty(max(0, free - headroom_mib * MIB), dtype=torch.uint8, device="cuda")
            try:
                splits = batcher.totals.oom_splits
                outcome, vectors, seconds = embed(batch)
            finally:
                del hold
                _release()
            diff = f"{np.abs(vectors - expected).max():.2e}" if vectors is not None and len(batch) > 1 else ""
            print(f"| {headroom_mib} MiB free | {label} | {outcome} | {diff} | {batcher.totals.oom_splits - splits} "
                  f"| {batcher.budget_tokens} | {seconds:.2f} |", flush=True)
        health = health_pb2_grpc.HealthStub(srv.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10)
        outcome, vectors, _ = embed(texts)
        print(f"after: health {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}, "
              f"unsqueezed request {outcome}, max abs diff "
              f"{np.abs(vectors - expected).max() if vectors is not None else float('nan'):.2e}; "
              f"totals {batcher.totals}", flush=True)


def published_check(where: Path, device: str, sizes: dict[str, int] | None = None) -> None:
    """Both published config.json revisions, full size, served on `device` against the float64 reference."""
    from client import Task
    from nomic_embed.v1 import embed_pb2 as pb
    from nomic_embed.v1 import embed_pb2_grpc
    from tools.reference import ReferenceNomic
    from tools.servers import running_server

    short = "The cat sat on the mat."
    words = ("retrieval", "over", "whole", "pages", "of", "text", "needs", "long", "context", "windows")
    long = " ".join(words[i % len(words)] + str(i // len(words)) for i in range(1400))
    tasks = {Task.SEARCH_DOCUMENT: "search_document", Task.SEARCH_QUERY: "search_query",
             Task.CLUSTERING: "clustering", Task.CLASSIFICATION: "classification"}
    print("\n| revision | variant (asked) | Info: variant, max_input_tokens, trained_positions | short max abs diff "
          "| short min cos | long tokens | long max abs diff | long cos |\n|---|---|---|---|---|---|---|---|",
          flush=True)
    for style in ("original", "v5"):
        size = sizes or {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072}
        path = write_tiny_nomic(where / f"published-{style}", **size, max_trained_positions=2048,
                                config_style=style, seed=5)
        ref = ReferenceNomic(path, rotary_scaling_factor=2.0)
        want_short = {(t, d): ref.embed(short, prefix=p, dimensions=d)
                      for t, p in tasks.items() for d in (64, ref.hidden)}
        want_long = ref.embed(long, prefix="search_document")
        for asked in ("auto", "fp32"):
            with running_server(str(path), device=device, variant=asked, threads=0) as srv:
                info = embed_pb2_grpc.EmbedServiceStub(srv.channel()).Info(pb.InfoRequest(), timeout=60)
                diffs, coss = [], []
                with srv.client() as client:
                    for (task, dims), want in want_short.items():
                        got = client.embed([short], task, dims)[0].astype(np.float64)
                        diffs.append(np.abs(got - want).max())
                        coss.append(float(got @ want))
                    e = client.embed_response([long], Task.SEARCH_DOCUMENT).embeddings[0]
            got_long = np.array(e.values, dtype=np.float64)
            print(f"| {style} | {asked} | {info.variant}, {info.max_input_tokens}, {info.trained_positions} "
                  f"| {max(diffs):.2e} | {min(coss):.6f} | {e.tokens} | {np.abs(got_long - want_long).max():.2e} "
                  f"| {float(got_long @ want_long):.6f} |", flush=True)
            _release()


def serve_check(device: str, texts: int) -> None:
    """`python -m bench` on the device, one text per request and 64 per stream message; its tables, targets and
    JSON files (bench/results/) are the record."""
    from bench.run import main as bench

    server_args = f"--device {device}"
    for name, argv in (
        ("one text per request", ["--modes", "unary", "--concurrency", "256", "--texts-per-request", "1"]),
        ("64 texts per stream message", ["--modes", "stream", "--concurrency", "32", "--texts-per-request", "64",
                                         "--no-host-cost"]),
    ):
        print(f"\n## serving: {name}", flush=True)
        results = bench(["--server-args", server_args, "--texts", str(texts), "--idle-queries", "30", *argv])
        runs = results["runs"]
        assert isinstance(runs, list)
        idle = results["idle_query"]
        assert isinstance(idle, dict)
        best = max(r["tok_s"] for r in runs)
        goal = 250_000 if name.startswith("one") else 600_000
        targets = results.get("targets") or {}
        assert isinstance(targets, dict)
        same = next((value for key, (value, _, _) in targets.items() if key.endswith("vs ST same variant")),
                    float("nan"))
        print(f"goal {goal:,} tok/s: {best:,.0f} ({'met' if best >= goal else 'NOT met'}); x sentence-transformers "
              f"at the same variant {same:.2f} (goal >= 2: {'met' if same >= 2 else 'NOT met'}); idle query p50 "
              f"{idle['server_p50_ms']:.2f} ms (goal <= 3: {'met' if idle['server_p50_ms'] <= 3 else 'NOT met'})",
              flush=True)
        _release()


def replicas_check(model: Path, device: str, texts: list[str], counts: list[int], tmp: Path,
                   concurrency: int = 256) -> None:
    """N whole servers on the device, each with 1/N of its free memory, the load spread evenly over them."""
    from concurrent.futures import ThreadPoolExecutor

    from bench.host_cost import tree_cpu_s
    from bench.load import LoadResult, drive_from_another_process
    from tools.servers import server_processes

    free = probe_device(device).free_bytes
    print("\n| servers | memory each | tok/s | texts/s | p50 ms | p99 ms | errors | server CPU us/text |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|", flush=True)
    for count in counts:
        share = int(free * 0.9 / count)
        with server_processes(str(model), count, tmp, "--device", device, "--variant", "auto",
                              "--max-memory", f"{share // MIB}MiB") as servers:
            shares = [[[t] for t in texts[i::count]] for i in range(count)]

            def drive(job: tuple[str, int, list[list[str]]]) -> LoadResult:
                return drive_from_another_process(job[0], "unary", job[1], job[2])

            with ThreadPoolExecutor(count) as pool:
                each = max(1, concurrency // count)
                list(pool.map(drive, [(s.target, each, r[:200]) for s, r in zip(servers, shares, strict=True)]))
                before = sum(tree_cpu_s(s.process.pid)[0] for s in servers)  # type: ignore[arg-type]
                loads = list(pool.map(drive, [(s.target, each, r) for s, r in zip(servers, shares, strict=True)]))
                cpu = sum(tree_cpu_s(s.process.pid)[0] for s in servers) - before  # type: ignore[arg-type]
        wall = max(load.wall_s for load in loads)
        done = sum(load.texts for load in loads)
        latencies = np.sort(np.concatenate([load.latencies_s for load in loads]))
        p50, p99 = (float(latencies[int(q * (len(latencies) - 1))]) * 1e3 if len(latencies) else float("nan")
                    for q in (0.5, 0.99))
        tokens, errors = sum(load.tokens for load in loads), sum(len(load.errors) for load in loads)
        print(f"| {count} | {share // MIB:,} MiB | {tokens / wall:,.0f} | {done / wall:,.0f} | {p50:.1f} | {p99:.1f} "
              f"| {errors} | {cpu / max(done, 1) * 1e6:,.0f} |", flush=True)
        _release()


def _docstrings(count: int) -> list[str]:
    """`count` standard-library docstrings of up to 1,500 characters (as many as there are, if fewer)."""
    from bench.corpus import stdlib_docstrings

    return [t for t in stdlib_docstrings() if len(t) <= 1500][:count]


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
