"""`make bench`: the real server against in-process sentence-transformers, on the same texts, in one run.

1. a full-size NomicBERT (random weights, original hub layout) and a sample of standard-library docstrings;
2. the server, in this process (its own event loop and model thread), on a loopback port;
3. sentence-transformers `encode` (batch 32) at fp32, and around the server's own model (its variant);
4. one 16-token query at idle: the server over gRPC against the same forward pass in-process, alternately;
5. load from a separate process (python -m bench.load) at each concurrency, unary and streaming;
6. the baselines once more (the machine's load drifts: their mean faces the drift the runs faced);
7. every variant the device runs, side by side (bench.variants): each served in turn, one text per request at
   the top concurrency, against sentence-transformers at fp32 and at that variant, with its cosine to fp32;
8. host cost (bench.host_cost): the server's CPU per one-text request with a near-free model, beside a bare
   grpc.aio echo, both in processes of their own;
9. tables with the ratios, the targets, and a JSON file under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
import torch

from bench import corpus, host_cost, variants
from bench.model import full_size_checkpoint
from bench.report import RunSummary, load_average, machine, table
from bench.serving import DOCUMENT_PREFIX, BaselineRunner, Baselines, Corpus, drive, served_vectors
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.config import parse_args
from server.engine import matryoshka
from server.engine.tokenization import TextTokenizer
from server.model.runner import Runner
from server.model.tokenizer import load_tokenizer
from tools.servers import RunningServer, running_server

QUERY_PREFIX = "search_query: "
QUERY = "how do I read a large file line by line and strip the trailing newline characters"
RESULTS_DIR = Path(__file__).parent / "results"

log = logging.getLogger("bench")


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="auto", help="the server's --variant")
    p.add_argument("--texts", type=int, default=128, help="texts per run at concurrency >= 8 (a quarter below)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 texts, concurrency 1 and 8")
    p.add_argument("--max-text-tokens", type=int, default=512, help="longest text of the sample, in tokens")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--concurrency", default="1,8,64")
    p.add_argument("--modes", default="unary,stream")
    p.add_argument("--server-args", default="", help='more server flags, e.g. "--threads 1 --batch-wait-ms 5"')
    p.add_argument("--no-st", action="store_true", help="skip the sentence-transformers baselines (no ratios)")
    p.add_argument("--no-host-cost", action="store_true", help="skip the host-cost measurement")
    p.add_argument("--compare", default=None,
                   help="variants to serve side by side after the main run: all (every one the device runs; the "
                        "default, but none with --quick), none, or a comma-separated list")
    p.add_argument("--host-cost-requests", type=int, default=4000, help="one-text requests per host-cost run")
    p.add_argument("--idle-queries", type=int, default=15, help="pairs of idle query timings")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nomic-embed-grpc-bench")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/<time>.json)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.concurrency, args.host_cost_requests = 32, "1,8", 1000
    if args.compare is None:
        args.compare = "none" if args.quick else "all"
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = args.modes.split(",")
    return args


def _corpus(tokenizer: TextTokenizer, args: argparse.Namespace) -> Corpus:
    docstrings = corpus.cached_docstrings(args.cache_dir)
    counts = [len(ids) + tokenizer.special_tokens for ids in tokenizer.content_ids(docstrings, DOCUMENT_PREFIX)]
    chosen = corpus.sample(docstrings, counts, args.texts, max_tokens=args.max_text_tokens, seed=args.seed)
    return Corpus([docstrings[i] for i in chosen], [counts[i] for i in chosen])


def _sixteen_token_query(tokenizer: TextTokenizer) -> tuple[str, list[int]]:
    words = QUERY.split()
    for n in range(1, len(words) + 1):
        text = " ".join(words[:n])
        row = tokenizer.wrap(tokenizer.content_ids([text], QUERY_PREFIX)[0])
        if len(row) == 16:
            return text, row
    raise RuntimeError("no prefix of the query words makes 16 tokens")


def _idle_query(srv: RunningServer, runner: Runner, text: str, row: list[int], pairs: int) -> dict[str, float]:
    """p50 of one query over gRPC and of the same forward pass in-process, timed alternately."""
    request = pb.EmbedRequest(texts=[text], task=pb.TASK_SEARCH_QUERY)
    forward, served, beside_model = [], [], []
    with grpc.insecure_channel(srv.target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        stub.Embed(request, timeout=60)  # connect
        for _ in range(pairs):
            started = time.perf_counter()
            runner.run([row])
            forward.append(time.perf_counter() - started)
            started = time.perf_counter()
            response = stub.Embed(request, timeout=60)
            served.append(time.perf_counter() - started)
            assert response.embeddings[0].tokens == len(row)
            # Within one request, so the machine's load cannot move it: all but the model's own time.
            beside_model.append(served[-1] - response.metadata.inference_time.ToNanoseconds() / 1e9)
    return {"in_process_forward_p50_ms": 1000 * float(np.median(forward)),
            "server_p50_ms": 1000 * float(np.median(served)),
            "added_ms": 1000 * float(np.median(served) - np.median(forward)),
            "beside_model_p50_ms": 1000 * float(np.median(beside_model)), "pairs": pairs}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    load_before = load_average()
    path = full_size_checkpoint(args.cache_dir)
    tokenizer = TextTokenizer(*load_tokenizer(path))
    data = _corpus(tokenizer, args)
    log.info("corpus: %s", data.describe())
    config = parse_args(["--model", str(path), "--variant", args.variant, *shlex.split(args.server_args)], env={})
    overrides = {k: v for k, v in asdict(config).items() if k not in ("model", "host", "port")}
    results: dict[str, object] = {"machine": machine(), "args": {**vars(args), "cache_dir": str(args.cache_dir)},
                                  "corpus": data.describe()}
    runs: list[RunSummary] = []
    with running_server(str(path), **overrides) as srv:
        loaded = srv.app.loaded
        assert loaded is not None
        variant, policy = loaded.served.variant, loaded.batcher.policy
        results["server"] = {"variant": variant, "variant_reason": loaded.served.variant_reason,
                             "policy": asdict(policy), "threads": torch.get_num_threads(),
                             "unpadded": loaded.runner.unpadded, "server_args": args.server_args}
        log.info("server: variant %s, unpadded %s, budget %d tokens / %d rows, wait %.1f ms, %d threads", variant,
                 loaded.runner.unpadded, policy.max_batch_tokens, policy.max_batch_rows, policy.wait_s * 1000,
                 torch.get_num_threads())
        baselines = None if args.no_st else BaselineRunner(path, variant, loaded.runner, data)
        if baselines:
            baselines.one_pass()
            assert baselines.fp32_vectors is not None
            want = np.stack([matryoshka.finish(v, v.shape[0], layer_norm=True) for v in baselines.fp32_vectors[:8]])
            results["max_abs_diff_vs_st_fp32"] = float(np.abs(served_vectors(srv, data.texts[:8]) - want).max())
        results["idle_query"] = _idle_query(srv, loaded.runner, *_sixteen_token_query(tokenizer), args.idle_queries)
        log.info("idle 16-token query: %s", results["idle_query"])
        for mode in args.modes:
            for concurrency in args.concurrency:
                n = len(data.texts) if concurrency >= 8 else max(8, len(data.texts) // 4)
                requests = [data.texts[i : i + args.texts_per_request] for i in range(0, n, args.texts_per_request)]
                runs.append(drive(srv, mode, concurrency, requests))
        if baselines:
            baselines.one_pass()
        device_kind = loaded.runner.device.type
    compare = variants.parse_compare(args.compare, device_kind)
    if compare:
        top = max(args.concurrency)
        results["variants"] = {"concurrency": top, "results": [
            r.as_dict() for r in variants.compare(path, data, compare, top, overrides, baselines=not args.no_st)]}
    if not args.no_host_cost:
        # After the full-size server has stopped: these servers run in processes of their own.
        costs = host_cost.run(host_cost.CONCURRENCY, args.host_cost_requests, shlex.split(args.server_args))
        results["host_cost"] = [host_cost.as_dict(c) for c in costs]
    results["st"] = asdict(baselines.result) if baselines else {}
    results["runs"] = [{**asdict(r), "tok_s": r.tok_s, "texts_s": r.texts_s} for r in runs]
    results["load_average"] = {"before": load_before, "after": load_average()}
    _report(results, runs, baselines.result if baselines else None, variant, args.out)
    return results


def _report(results: dict[str, object], runs: list[RunSummary], st: Baselines | None, variant: str,
            out: Path | None) -> None:
    fp32, same = (st.tok_s("fp32"), st.tok_s(variant)) if st else (float("nan"), float("nan"))
    host = results["machine"]
    assert isinstance(host, dict)
    print(f"\nmachine: {host['cpu']}, {host['cores']} cores, flags {host['cpu_flags']}, GPU {host['gpu'] or 'none'}, "
          f"torch {host['torch']}, commit {host['commit']}")
    if st:
        print(f"sentence-transformers encode, batch 32: fp32 {fp32:.0f} tok/s, {variant} {same:.0f} tok/s "
              f"(passes before/after the runs: {st.passes}); its batches are {st.padded_fraction:.0%} padding")
    print(table(runs, fp32, same))
    idle = results["idle_query"]
    assert isinstance(idle, dict)
    print(f"\nidle 16-token query: server p50 {idle['server_p50_ms']:.1f} ms, in-process forward p50 "
          f"{idle['in_process_forward_p50_ms']:.1f} ms: {idle['added_ms']:+.1f} ms; time beside the model's "
          f"own (same request) p50 {idle['beside_model_p50_ms']:.1f} ms")
    compared = results.get("variants")
    if isinstance(compared, dict):
        print("\n" + variants.table([variants.VariantResult.from_dict(r) for r in compared["results"]],
                                    compared["concurrency"]))
    costs = [host_cost.HostCost(**{k: v for k, v in c.items() if k in host_cost.FIELDS})
             for c in results.get("host_cost", [])]  # type: ignore[union-attr]
    if costs:
        print("\n" + host_cost.report(costs, host_cost.CONCURRENCY))
    targets = _targets(runs, fp32, same, idle) if st else {}
    server_cost = next((c for c in costs if c.name == host_cost.SERVER), None)
    if server_cost is not None:
        value = server_cost.cpu_us_per_request
        targets["host cost: server CPU per one-text request, us"] = (value, "<= 400", value <= 400)
    results["targets"] = targets
    for name, (value, goal, met) in targets.items():
        print(f"target {name}: {value:.2f} (goal {goal}) {'met' if met else 'NOT met'}")
    print(f"load average before {results['load_average']['before']}, after "  # type: ignore[index]
          f"{results['load_average']['after']}")  # type: ignore[index]
    if out is None:
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    print(f"results: {out}")


def _targets(runs: list[RunSummary], fp32: float, same: float,
             idle: dict[str, float]) -> dict[str, tuple[float, str, bool]]:
    targets: dict[str, tuple[float, str, bool]] = {}
    top = max((r.concurrency for r in runs), default=0)
    for r in (r for r in runs if r.concurrency == top):
        targets[f"{r.mode} c{top} vs ST same variant"] = (r.tok_s / same, ">= 1.5", r.tok_s / same >= 1.5)
        targets[f"{r.mode} c{top} vs ST fp32"] = (r.tok_s / fp32, ">= 6 with the default variant", r.tok_s / fp32 >= 6)
        targets[f"{r.mode} c{top} padded fraction"] = (r.padded_fraction, "<= 0.10", r.padded_fraction <= 0.10)
    targets["idle query: p50 server - p50 in-process forward, ms"] = (idle["added_ms"], "<= 2", idle["added_ms"] <= 2)
    targets["idle query: p50 time beside the model, ms"] = (idle["beside_model_p50_ms"], "<= 2",
                                                           idle["beside_model_p50_ms"] <= 2)
    return targets
