"""The signals that stop a server (and --workers' supervisor) gracefully: it drains, then exits."""

from __future__ import annotations

import signal


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM and SIGINT; SIGHUP too (its terminal closed), unless it is ignored, as under nohup, which asks the
    server to outlive its terminal."""
    hangup = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return signal.SIGTERM, signal.SIGINT, *hangup
