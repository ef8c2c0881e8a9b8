"""The one place that wires the server together, in order, and takes it apart in reverse.

start: bind the port (health NOT_SERVING) -> probe the device -> choose a variant -> load -> warm up
-> start the batcher -> health SERVING.  stop: health NOT_SERVING -> stop accepting RPCs -> finish
admitted work -> stop the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import server
from nomic_embed.v1 import embed_pb2
from quant.policy import NoVariantFits, Request, choose_variant
from server.config import ServerConfig, host_port
from server.daemon_thread import in_daemon_thread
from server.domain import MIN_MAX_TOKENS, EmbedResult, Limits, ModelFacts, Task
from server.engine.batcher import Batcher, BatchPolicy
from server.engine.embedder import Embedder
from server.engine.tokenization import TextTokenizer
from server.errors import StartupError
from server.event_loop import loop_name
from server.heap import freeze_startup_objects, thaw
from server.model.buckets import Buckets
from server.model.device import available_cpus, probe_device, set_threads
from server.model.integrity import check_warm_up, check_weights
from server.model.loader import CheckpointMismatch, checkpoint_info, load_model
from server.model.rotary import PerRowNTKRotary
from server.model.runner import Runner, install_per_row_rotary
from server.model.source import resolve_model
from server.model.spec import read_model_spec
from server.model.tokenizer import load_tokenizer
from server.observability.metrics import Metrics
from server.signals import stop_signals
from server.supervisor import worker_memory
from server.transport.metrics_hooks import MetricsHooks
from server.transport.options import grpc_options
from server.transport.ports import free_addresses
from server.transport.request_ids import RequestIdHooks
from server.transport.rpc_hooks import HookInterceptor
from server.transport.security import BearerTokenAuth, server_credentials
from server.transport.service import EmbedService, ServedModel
from server.transport.tokens import load_tokens
from server.transport.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = embed_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name
# On shutdown, how long calls still arriving after the queue has drained are refused before the transport
# stops (see App.stop): a client's round trip plus its first retry.
_STRAGGLERS_S = 0.5


@dataclass
class Loaded:
    embedder: Embedder
    batcher: Batcher
    served: ServedModel
    limits: Limits
    runner: Runner  # the model behind the batcher: benchmarks compare against it in-process


class App:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.grpc_server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.service = EmbedService()
        self.metrics = Metrics()
        self.tracing: Tracing | None = None
        self.loaded: Loaded | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.phase = "starting"  # what start-up is doing now, for the log of a stop that comes meanwhile
        self._stopping = False  # stop() began: health stays NOT_SERVING
        self._tokens = 0  # bearer tokens accepted (0: no authentication)

    def _enter(self, phase: str) -> None:
        self.phase = phase
        log.info("start-up: %s", phase)

    async def start(self) -> int:
        """Bind, load and warm up; returns the bound port once SERVING.

        A worker of --workers binds only once loaded: the port is shared, and the kernel would hand it
        connections it cannot serve yet while the other workers can (its supervisor checked the port)."""
        credentials = self._prepare()  # files and facts the flags name: refused before anything loads
        late = self.config.workers > 1
        if not late:
            await self._listen(credentials)
        started = time.monotonic()
        self.loaded = await in_daemon_thread(load, self.config, self._enter)
        if late:
            await self._listen(credentials)
        self._observe(self.loaded)
        self.loaded.batcher.start()
        self.service.attach(self.loaded.embedder, self.loaded.served, self.loaded.limits)
        freeze_startup_objects()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        s = self.loaded.served
        log.info("SERVING %s (weights %s) as %s on %s, port %d (ready in %.1fs; variant: %s)", s.facts.model_id,
                 s.weights_digest, s.variant, s.device, self.port, time.monotonic() - started, s.variant_reason)
        return self.port

    def _prepare(self) -> grpc.ServerCredentials | None:
        """The grpc server with its services, from the facts of this host and the files the config names (each
        checked here, before anything binds or loads); returns its TLS credentials, or None for plaintext."""
        c = self.config
        cpus = available_cpus()
        if c.threads > cpus:
            raise StartupError(f"--threads {c.threads} is more than the {cpus} CPU(s) this process may use (its "
                               f"CPU affinity and cgroup quota); use at most {cpus}, or 0 for all of them")
        credentials = server_credentials(c.tls_cert, c.tls_key, c.tls_client_ca)
        tokens = load_tokens(c.auth_token_file, c.auth_tokens_env)
        # Tracing first, so that its span covers the rest; then metrics, so that refused calls are counted
        # too; request ids before authentication, so that refusals carry one.
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if c.otlp_endpoint:
            self.tracing = Tracing(c.otlp_endpoint, server.__version__)
            interceptors.append(self.tracing.interceptor)
        interceptors.append(HookInterceptor(MetricsHooks(self.metrics), RequestIdHooks(access=c.access_log)))
        if tokens:
            interceptors.append(BearerTokenAuth(tokens))
        self.grpc_server = grpc.aio.server(options=grpc_options(self.config), interceptors=interceptors)
        self.service.add_to_server(self.grpc_server)  # lenient deserializers: see EmbedService.add_to_server
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc_server
        )
        self._tokens = len(tokens)
        return credentials

    async def _listen(self, credentials: grpc.ServerCredentials | None) -> None:
        c = self.config
        assert self.grpc_server is not None
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = c.address(c.port)
        if c.worker_index is None:  # (a worker's port is held by its supervisor, which checked it)
            free_addresses(c.host, c.port, f"cannot listen on {address} (--port)")
        try:
            if credentials is None:
                self.port = self.grpc_server.add_insecure_port(address)
            else:
                self.port = self.grpc_server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {address}: {exc} (is the port already in use, or the host not "
                               "an address of this machine?)") from None
        if not self.port:
            raise StartupError(f"cannot listen on {address} (is the port already in use, or the host not an "
                               "address of this machine?)")
        if c.metrics_port is not None:
            # Bound with the gRPC port, before loading: a port that is taken fails the start in seconds, not
            # minutes. A worker of --workers serves on a loopback port of its own, which its supervisor reads
            # and serves at --metrics-port with the other workers' (server.observability.workers).
            host, port = ("127.0.0.1", 0) if c.worker_index is not None else (c.host, c.metrics_port)
            try:
                self.metrics_port = self.metrics.serve(host, port)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {host_port(host, port)} (--metrics-port): "
                                   f"{exc.strerror or exc}") from None
            log.info("metrics on http://%s/metrics%s", host_port(host, self.metrics_port),
                     "" if c.worker_index is None else " (read by the supervisor)")
        await self.grpc_server.start()
        log.info("listening on %s (%s%s; %s)%s", c.address(self.port),
                 "mTLS" if c.tls_client_ca else "TLS" if credentials else "plaintext",
                 f", {self._tokens} bearer token(s)" if self._tokens else "", loop_name(asyncio.get_running_loop()),
                 "" if self.loaded else "; NOT_SERVING until the model is loaded")

    def _observe(self, loaded: Loaded) -> None:
        s, m = loaded.served, self.metrics
        m.describe_model(model_id=s.facts.model_id, variant=s.variant, device=s.device, reason=s.variant_reason)
        loaded.embedder.on_result = m.observe_result
        if (tracing := self.tracing) is not None:
            def observe(result: EmbedResult) -> None:
                m.observe_result(result)
                tracing.observe_result(s.variant, result)

            loaded.embedder.on_result = observe
        loaded.batcher.delivery.on_batch = m.observe_batch
        loaded.batcher.delivery.on_out_of_memory = m.observe_out_of_memory
        unhealthy: set[asyncio.Task[None]] = set()  # held until done

        def health(state: int) -> None:
            task = asyncio.ensure_future(self._set_health(state))
            unhealthy.add(task)
            task.add_done_callback(unhealthy.discard)

        def out_of_service() -> None:  # the model is broken: NOT_SERVING until the warm-up rows pass again
            m.model_broken.set(1)
            health(health_pb2.HealthCheckResponse.NOT_SERVING)

        def back_in_service() -> None:
            m.model_broken.set(0)
            if not self._stopping:  # a server shutting down stays NOT_SERVING
                health(health_pb2.HealthCheckResponse.SERVING)

        loaded.batcher.delivery.on_non_finite = m.observe_non_finite
        loaded.batcher.delivery.on_model_broken = lambda event: out_of_service()
        loaded.batcher.delivery.on_model_recovered = back_in_service
        m.batch_budget.set(loaded.batcher.budget_tokens)
        m.queue_tokens.set_function(lambda: loaded.batcher.queued_tokens)

    async def _set_health(self, state: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, state)

    async def stop(self) -> None:
        self._stopping = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + self.config.grace_s  # one grace period for the whole drain
        self.service.drain()
        if self.loaded:
            # Admitted work finishes while the transport still takes calls, and the transport stays up a
            # moment longer for calls sent before their callers heard of the shutdown: the app refuses them
            # (UNAVAILABLE, which clients retry elsewhere), where grpc core's stop would CANCEL every call it
            # has received but not yet handed to a handler.
            await self.loaded.batcher.stop(self.config.grace_s)
            await asyncio.sleep(min(_STRAGGLERS_S, max(0.0, deadline - time.monotonic())))
        if self.grpc_server:
            # Stops accepting RPCs; handlers already running finish within what is left of the grace period.
            await self.grpc_server.stop(max(0.0, deadline - time.monotonic()))
        self.metrics.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        thaw()
        if self.port or self.loaded:  # a start refused before either has only its refusal to say
            log.info("stopped")


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
    served = ServedModel(facts=facts, variant=decision.variant.name, variant_reason=reason,
                         device=device.describe(), weight_bytes=loaded.weight_bytes, server_version=server.__version__,
                         weights_digest=digest)
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
    if config.max_batch_tokens < limit:
        raise StartupError(f"--max-batch-tokens {config.max_batch_tokens} is below the input limit of {limit} tokens "
                           f"(--max-input-tokens {config.max_input_tokens or '0: the model limit'}), so a text of that "
                           "length would not fit a batch; raise it or lower --max-input-tokens")
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


class StoppedWhileStarting(Exception):
    """A stop signal came before the model was served; the loader thread may still be inside torch."""


async def run(config: ServerConfig, on_serving: Callable[[int | None], None] = lambda metrics_port: None) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP, then drain; `on_serving` hears of SERVING, with the metrics port (None:
    no metrics). A second signal exits at once.

    A worker of --workers hears a stop from several senders at once (its supervisor; the kernel when the
    supervisor dies, once per thread of it; a process manager signalling the whole group), so it takes every
    stop signal as that one stop, and exits at once on SIGQUIT, which only its supervisor sends.

    Raises StoppedWhileStarting when the signal comes before SERVING: the caller leaves without waiting
    for the loader thread.
    """
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    worker = config.worker_index is not None
    signals = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        at_once = sig == signal.SIGQUIT or (signals > 1 and not worker)
        if not at_once or app.loaded is None:  # before SERVING every stop is at once: the start is abandoned
            stop.set()
            return
        requests, rows = app.loaded.batcher.pending()
        log.warning("%s%s: exiting now, dropping %d admitted requests (%d rows uncomputed)", sig.name,
                    "" if sig == signal.SIGQUIT else " again", requests, rows)
        exit_now(128 + sig)

    for sig in (*stop_signals(), *((signal.SIGQUIT,) if worker else ())):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        start = asyncio.ensure_future(app.start())
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([start, waiter], return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            log.info("stop requested while %s: exiting without serving", app.phase)
            raise StoppedWhileStarting(app.phase)
        start.result()  # raises StartupError
        on_serving(app.metrics_port)
        await waiter
        log.info("shutting down: draining admitted work (grace %gs)", config.grace_s)
    finally:
        await app.stop()


def exit_now(code: int) -> None:
    """Leave without finalizing the interpreter: a thread inside torch would abort it (std::terminate)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
