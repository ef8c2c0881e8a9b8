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

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import server
from nomic_embed.v1 import embed_pb2
from server.config import ServerConfig, host_port
from server.daemon_thread import in_daemon_thread
from server.domain import EmbedResult
from server.errors import StartupError
from server.event_loop import loop_name
from server.heap import freeze_startup_objects, thaw
from server.loading import Loaded, load
from server.model.device import available_cpus
from server.observability.metrics import Metrics
from server.signals import stop_signals
from server.transport.metrics_hooks import MetricsHooks
from server.transport.options import grpc_options
from server.transport.ports import free_addresses
from server.transport.request_ids import RequestIdHooks
from server.transport.rpc_hooks import HookInterceptor
from server.transport.security import BearerTokenAuth, server_credentials
from server.transport.service import EmbedService
from server.transport.tokens import load_tokens
from server.transport.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = embed_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name
# On shutdown, how long calls still arriving after the queue has drained are refused before the transport
# stops (see App.stop): a client's round trip plus its first retry.
_STRAGGLERS_S = 0.5


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
        log.info("SERVING %s (weights %s, model %s) as %s on %s, port %d (ready in %.1fs; variant: %s)",
                 s.facts.model_id, s.weights_digest, s.model_digest, s.variant, s.device, self.port,
                 time.monotonic() - started, s.variant_reason)
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
        m.queue_callers.set_function(lambda: loaded.batcher.queued_callers)

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
