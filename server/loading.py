"""Starting the model: probe the device, find and check the checkpoint, choose the variant, load the weights,
warm up, and wire the engine that serves it (blocking: the server runs it off its event loop)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import server
from quant.policy import NoVariantFits, Request, choose_variant
from server.config import ServerConfig
from server.domain import MIN_MAX_TOKENS, Limits, ModelFacts, Task
from server.engine.batcher import Batcher, BatchPolicy
from server.engine.embedder import Embedder
from server.engine.tokenization import TextTokenizer
from server.errors import StartupError
from server.model.buckets import Buckets
from server.model.device import available_cpus, probe_device, set_threads
from server.model.fingerprint import model_digest
from server.model.integrity import check_warm_up, check_weights
from server.model.loader import CheckpointMismatch, checkpoint_info, load_model
from server.model.rotary import PerRowNTKRotary
from server.model.runner import Runner, install_per_row_rotary
from server.model.source import resolve_model
from server.model.spec import read_model_spec
from server.model.tokenizer import load_tokenizer
from server.supervisor import worker_memory
from server.transport.service import ServedModel

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    embedder: Embedder
    batcher: Batcher
    served: ServedModel
    limits: Limits
    runner: Runner  # the model behind the batcher: benchmarks compare against it in-process


def load(config: ServerConfig, enter: Callable[[str], None] = lambda phase: None) -> Loaded:
    """Probe, choose, load and warm up (blocking: runs off the event loop). `enter` hears each phase."""
    threads = config.threads or max(1, available_cpus() // config.workers)  # --workers share the CPUs
    set_threads(threads)
    enter("probing the device")
    try:
        device = probe_device(config.device)
    except RuntimeError as exc:
        raise StartupError(str(exc)) from None
    enter(f"finding {config.model}" + (f" at revision {config.revision}" if config.revision else ""))
    source = resolve_model(config.model, config.revision)
    path = source.path
    spec = read_model_spec(path, config.rotary_scaling_factor, source.revision, config.model)
    facts = spec.facts
    log.info("checkpoint %s%s: %d wide, %d layers, input limit %d tokens%s", path,
             f" (revision {facts.revision})" if facts.revision else "", facts.hidden_size, facts.num_layers,
             facts.max_input_tokens, f", trained on {facts.trained_positions} positions" if spec.rotary else "")
    max_input = _input_limit(config, facts)
    tokenizer = TextTokenizer(*load_tokenizer(path))
    tokenizer.check(path, int(spec.config.vocab_size), spec.tokenizer_probe)
    # The batch token budget is the configured one, lowered by the policy to what fits in memory.
    # CUDA graphs replay the NomicBERT forward (server.model.buckets): other models run eagerly, without their memory.
    cap, source = worker_memory(config, device.free_bytes)
    request = Request(config.variant, cap, config.max_batch_tokens, longest_row=max_input,
                      graph_tokens=config.cuda_graph_tokens if facts.nomic else 0, memory_source=source)
    try:
        decision = choose_variant(device, checkpoint_info(path, spec.config), request)
    except (NoVariantFits, ValueError, CheckpointMismatch) as exc:
        raise StartupError(str(exc)) from None
    log.info("variant %s: %s", decision.variant.name, decision.reason)
    enter("checking the weight files")
    digest = check_weights(path)
    enter(f"loading the weights as {decision.variant.name}")
    try:
        loaded = load_model(path, spec.config, decision, device.torch_device)
    except CheckpointMismatch as exc:
        raise StartupError(str(exc)) from None
    if spec.rotary is not None:
        install_per_row_rotary(loaded.model, PerRowNTKRotary(spec.rotary))
    runner = Runner(loaded.model, pooling=facts.pooling, pad_id=tokenizer.pad_id, device=device.torch_device,
                    per_row_rotary=spec.rotary is not None, compute_context=loaded.compute_context,
                    threads=threads, buckets=Buckets(decision.graph_tokens, config.max_batch_rows, max_input)
                    if decision.graph_tokens else None)
    reason = decision.reason
    if runner.buckets is not None:
        enter("capturing CUDA graphs")
        if not _capture_graphs(runner):
            reason += "; CUDA graphs failed to capture, so every batch runs eagerly (their memory stays unused)"
    limits = Limits(
        max_texts_per_request=config.max_texts_per_request, max_input_tokens=max_input,
        max_text_chars=config.max_text_chars, max_batch_tokens=decision.batch_tokens,
        max_batch_rows=config.max_batch_rows, max_queue_tokens=config.max_queue_tokens,
        max_request_tokens=config.max_request_tokens, max_request_bytes=config.max_request_bytes,
    )
    batcher = Batcher(runner, BatchPolicy(
        max_batch_tokens=limits.max_batch_tokens, max_batch_rows=limits.max_batch_rows,
        max_queue_tokens=limits.max_queue_tokens, wait_s=config.batch_wait_ms / 1000,
    ))
    enter("warming up")
    _warm_up(batcher, tokenizer)
    # The scaling factor changes vectors only of inputs past the trained length, which the input limit may forbid.
    scaling = spec.rotary.scaling_factor if spec.rotary and max_input > spec.rotary.max_trained_positions else None
    settings = {"pooling": facts.pooling, "max_input_tokens": max_input, "rotary_scaling_factor": scaling}
    served = ServedModel(facts=facts, variant=decision.variant.name, variant_reason=reason,
                         device=device.describe(), weight_bytes=loaded.weight_bytes, server_version=server.__version__,
                         weights_digest=digest, model_digest=model_digest(path, digest, settings))
    embedder = Embedder(tokenizer, batcher, facts, max_request_tokens=limits.max_request_tokens)
    return Loaded(embedder, batcher, served, limits, runner)


def _input_limit(config: ServerConfig, facts: ModelFacts) -> int:
    """--max-input-tokens, or the model's limit; refused where the model or the batch budget cannot take it."""
    if config.max_input_tokens > facts.max_input_tokens:
        raise StartupError(f"--max-input-tokens {config.max_input_tokens} is above {facts.model_id}'s input limit "
                           f"of {facts.max_input_tokens} tokens; lower it, or leave it 0 for the model's limit")
    limit = config.max_input_tokens or facts.max_input_tokens
    if limit < MIN_MAX_TOKENS:
        raise StartupError(f"{facts.model_id} takes inputs of {limit} tokens at most, below the {MIN_MAX_TOKENS} "
                           "every request needs (its sentence_bert_config.json or config.json says so)")
    given = f"(--max-input-tokens {config.max_input_tokens or '0: the model limit'})"
    if config.max_batch_tokens < limit:
        raise StartupError(f"--max-batch-tokens {config.max_batch_tokens} is below the input limit of {limit} tokens "
                           f"{given}, so a text of that length would not fit a batch; raise it or lower "
                           "--max-input-tokens")
    if config.max_request_tokens < limit:
        raise StartupError(f"--max-request-tokens {config.max_request_tokens} is below the input limit of {limit} "
                           f"tokens {given}, so a request of one text of that length would be refused; raise it or "
                           "lower --max-input-tokens")
    return limit


def _capture_graphs(runner: Runner) -> bool:
    """Capture the CUDA graphs; where capture fails, log why and serve every batch eagerly."""
    try:
        runner.capture_graphs()
        return True
    except Exception as exc:  # a kernel that cannot be captured: slower without graphs, never wrong
        runner.buckets = None
        log.warning("serving without CUDA graphs: capturing them failed: %s: %s", type(exc).__name__,
                    " ".join(str(exc).split())[:300])
        return False


def _warm_up(batcher: Batcher, tokenizer: TextTokenizer) -> None:
    started = time.monotonic()
    row = tokenizer.wrap(tokenizer.content_ids(["warm up the model"], Task.SEARCH_QUERY.prefix)[0])
    check_warm_up(lambda: batcher.run_now([row, row[:-2] + row[-1:]]), "warm up the model")
    log.info("warm-up took %.2fs", time.monotonic() - started)
