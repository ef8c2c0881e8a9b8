"""python -m server --model ID_OR_DIR --host H --port P --variant V  (--help lists every flag)"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType


def main(argv: list[str] | None = None) -> int:
    _stop_quietly_until_handled()
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers exist, e.g. while importing: a quiet exit
        return 130


def _stop_quietly_until_handled() -> None:
    """SIGTERM or SIGHUP before the server's own handlers exist (the seconds of imports) ends it with status
    0, as one while the model loads does, not killed by the signal; one that is ignored (nohup) stays so."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _exit_quietly)


def _exit_quietly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _main(argv: list[str]) -> int:
    # Imports here, not above: a Ctrl-C during them is answered by main, not with a traceback.
    import asyncio
    import logging
    import threading

    from server.config import parse_args
    from server.errors import StartupError
    from server.observability import logs

    config = parse_args(argv)  # a bad value exits 2 here, at once
    supervisor = config.workers > 1 and config.worker_index is None
    logs.configure(config.log_level, config.log_format, worker=config.worker_index)
    if config.worker_index is None:  # a model that cannot be found is told before the imports (seconds) or workers
        from server.model.source import refuse_early

        try:
            refuse_early(config.model, config.revision)
        except StartupError as exc:
            logging.getLogger("server").critical("cannot start: %s", exc)
            return 2
    if supervisor:  # no torch, no grpc
        from server.supervisor import supervise

        return supervise(config, argv)
    # torch and grpc take seconds to import: only once the flags are known good.
    from server.app import StoppedWhileStarting, exit_now, run
    from server.engine.batcher import MODEL_THREAD
    from server.event_loop import loop_factory
    from server.model.library_logs import route_library_logs

    route_library_logs(progress_bars=config.log_format == "text")  # progress bars would break JSON lines
    try:
        with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
            runner.run(run(config, on_serving=_on_serving(config.ready_fd)))
    except StartupError as exc:
        logging.getLogger("server").critical("cannot start: %s", exc)
        return 2
    except StoppedWhileStarting:
        exit_now(0)  # the loader thread may be inside a download or torch: do not wait for it
    if any(t.name == MODEL_THREAD and t.is_alive() for t in threading.enumerate()):
        # The grace period ended mid-batch: finalizing the interpreter under a thread still inside torch
        # aborts the process (std::terminate), so leave without finalizing; the callers were answered.
        exit_now(0)
    return 0


def _on_serving(ready_fd: int | None) -> Callable[[int | None], None]:
    """What a server does once SERVING: a worker of --workers starts telling its supervisor, on its pipe."""
    if ready_fd is None:
        return lambda metrics_port: None
    from server.supervisor import tell_supervisor

    return lambda metrics_port: tell_supervisor(ready_fd, metrics_port)


if __name__ == "__main__":
    sys.exit(main())
