"""transformers' and huggingface_hub's own logging, routed into the server's (server.observability.logs)."""

from __future__ import annotations


def route_library_logs(progress_bars: bool) -> None:
    """transformers logs through a handler of its own: send its lines through ours. Progress bars (loading
    weights, downloads) would break a stream of JSON lines: off unless the format is text."""
    import huggingface_hub.utils
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if not progress_bars:
        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
