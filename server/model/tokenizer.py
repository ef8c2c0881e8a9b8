"""Loading a checkpoint's tokenizer the way transformers does (tokenizer.json, or vocab.txt converted)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from server.errors import StartupError


class HubTokenizer(NamedTuple):
    """What the engine's TextTokenizer is made of: `TextTokenizer(*load_tokenizer(path))`."""

    tokenizer: Tokenizer
    pad_id: int
    unk_id: int | None


def load_tokenizer(path: Path) -> HubTokenizer:
    try:
        hf = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise StartupError(f"cannot load the tokenizer in {path}: {' '.join(str(exc).split())}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise StartupError(f"{path}: a fast tokenizer (tokenizer.json) is required")
    return HubTokenizer(backend, int(hf.pad_token_id if hf.pad_token_id is not None else 0), hf.unk_token_id)
