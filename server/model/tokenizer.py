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
    try:  # e.g. a WordPiece vocabulary without its unknown token (an empty vocab.txt) loads, then fails each text
        backend.encode("a")
    except Exception as exc:
        raise StartupError(f"the tokenizer in {path} cannot tokenize a text: {' '.join(str(exc).split())}. Are its "
                           "tokenizer files (tokenizer.json, vocab.txt) cut short or from another model?") from None
    return HubTokenizer(backend, int(hf.pad_token_id if hf.pad_token_id is not None else 0), hf.unk_token_id)
