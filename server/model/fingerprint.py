"""The model digest: one fingerprint of everything that decides a text's vector, so that clients can refuse to
mix vectors of two setups.

The weights have their own digest (server.model.integrity); a config edited in place, another tokenizer or
another input limit change the vectors while the weights stay, so the model digest also covers the files the
server reads beside the weights and the settings that change vectors. Of the files, not of their meaning, as
the weights' digest: replicas serving copies of the same files with the same settings agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

# Read beside the weights: the model's config (spec), the sentence-transformers files (pooling, input limit,
# prompts) and the tokenizer's (what transformers' AutoTokenizer reads). The pooling module's own config
# enters as the pooling it decides (the only setting of it the server accepts beside the mode).
READ_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
              "added_tokens.json")


def model_digest(path: Path, weights_digest: str, settings: Mapping[str, object]) -> str:
    """The first 16 hex digits of a sha256 over `weights_digest`, the sha256 of each of READ_FILES present in
    `path`, and `settings` (name and value, e.g. the pooling and the input limit)."""
    lines = [f"weights {weights_digest}"]
    for name in READ_FILES:
        file = path / name
        if file.is_file():
            with file.open("rb") as f:
                lines.append(f"{name} {hashlib.file_digest(f, 'sha256').hexdigest()}")
    lines += [f"{key} {value!r}" for key, value in sorted(settings.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
