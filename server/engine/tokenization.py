"""Tokenizing texts into model rows: task prefix, special tokens, truncation and windows."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from server.domain import PLAIN_ENGLISH, TokenizerProbe
from server.errors import StartupError


@dataclass(frozen=True)
class Rows:
    """One text as model rows (one row, or several windows in mean mode)."""

    rows: list[list[int]]
    tokens: int  # tokens the model reads over all rows
    truncated: bool
    full_tokens: int  # tokens of the whole text before any truncation


class TextTokenizer:
    """The checkpoint's own tokenizer, without the truncation or padding a tokenizer.json may carry."""

    def __init__(self, tokenizer: Tokenizer, pad_id: int, unk_id: int | None) -> None:
        # A private copy: the hub's tokenizer.json files sometimes carry truncation or padding.
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self.pad_id = pad_id
        self.unk_id = unk_id
        self._head, self._tail = self._special_template()
        self._prefix_lengths: dict[str, int] = {}

    def check(self, path: Path, vocab_size: int, probe: TokenizerProbe | None) -> None:
        """Refuse a tokenizer that would embed the wrong tokens: one missing its vocabulary (transformers then
        builds a near-empty one that maps every word to [UNK]), one cut short or edited (words past the cut
        fall into other pieces), another model's, or ids past the embeddings."""
        self._check_vocabulary(path, vocab_size, probe)
        text = probe.text if probe else PLAIN_ENGLISH
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if probe is not None and ids != list(probe.ids):
            raise StartupError(
                f"the tokenizer in {path} is not the model's: {text!r} gives ids {ids}, the model's vocabulary "
                f"({probe.vocabulary}) gives {list(probe.ids)}. Are its tokenizer files missing or from another model?")
        if probe is not None and (tuple(self._head), tuple(self._tail)) != (probe.head, probe.tail):
            raise StartupError(
                f"the tokenizer in {path} wraps a text in {self._head} ... {self._tail}, the model's vocabulary "
                f"({probe.vocabulary}) in {list(probe.head)} ... {list(probe.tail)}: its special tokens are not "
                "the model's (are its tokenizer files from another model?)")
        if self.unk_id is not None and ids.count(self.unk_id) > len(ids) // 2:
            raise StartupError(f"the tokenizer in {path} maps plain English words to the unknown token: "
                               f"{text!r} gives ids {ids}. Are its tokenizer files (tokenizer.json, vocab.txt) "
                               "missing?")
        # Every id the tokenizer can give, added tokens included: one past the rows fails its whole batch.
        too_big = max([*self._tok.get_vocab(with_added_tokens=True).values(), *self._head, *self._tail, self.pad_id])
        if too_big >= vocab_size:
            raise StartupError(f"the tokenizer in {path} gives ids up to {too_big}, beyond the model's {vocab_size} "
                               "embedding rows: are its tokenizer files from another model, or its embeddings cut?")

    def _check_vocabulary(self, path: Path, vocab_size: int, probe: TokenizerProbe | None) -> None:
        vocab = self._tok.get_vocab()
        if probe is None:
            # Embedding rows are often padded to a multiple of 8 or 64: more rows without a token is a cut.
            if len(vocab) + 64 < vocab_size:
                raise StartupError(f"the tokenizer in {path} has {len(vocab)} tokens for the model's {vocab_size} "
                                   "embedding rows: is its vocabulary (vocab.txt, tokenizer.json) cut short?")
            return
        if len(vocab) != probe.size:
            why = f"its vocabulary has {len(vocab)} tokens, {probe.vocabulary}'s {probe.size}"
        elif hashlib.sha256("\n".join(sorted(vocab, key=vocab.__getitem__)).encode()).hexdigest() != probe.digest:
            why = f"its vocabulary's {probe.size} tokens are not {probe.vocabulary}'s, in the same order"
        else:
            return
        raise StartupError(f"the tokenizer in {path} is not the model's: {why}. Are its tokenizer files "
                           "(tokenizer.json, vocab.txt) missing, cut short, edited or from another model?")

    def _special_template(self) -> tuple[list[int], list[int]]:
        """The special tokens a single sequence is wrapped in, e.g. [CLS] ... [SEP]."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return full[:start], full[start + len(plain) :]
        raise StartupError("cannot infer the tokenizer's special-token template")

    @property
    def special_tokens(self) -> int:
        return len(self._head) + len(self._tail)

    def content_ids(self, texts: Sequence[str], prefix: str, *, parallel: bool = False) -> list[list[int]]:
        """Token ids of prefix + text, without special tokens.

        `parallel` encodes on the tokenizer's own threads, with the interpreter lock released, so other threads
        run meanwhile; text by text holds the lock: on the event loop, giving it up costs a wait for the model
        thread's next switch (up to 5 ms; measured 3.6 ms per one-text call against a busy thread).
        """
        if parallel:
            return [e.ids for e in self._tok.encode_batch([prefix + t for t in texts], add_special_tokens=False)]
        return [self._tok.encode(prefix + t, add_special_tokens=False).ids for t in texts]

    def prefix_length(self, prefix: str) -> int:
        # A handful of task prefixes exist: tokenize each once, not on every request.
        if prefix not in self._prefix_lengths:
            self._prefix_lengths[prefix] = len(self._tok.encode(prefix, add_special_tokens=False).ids) if prefix else 0
        return self._prefix_lengths[prefix]

    def wrap(self, content: Sequence[int]) -> list[int]:
        return [*self._head, *content, *self._tail]

    def to_rows(self, content: list[int], *, limit: int, prefix_len: int, windows: bool) -> Rows:
        """Fit one text into `limit` tokens per row: as is, truncated, or as prefixed windows."""
        room = limit - self.special_tokens
        full = len(content) + self.special_tokens
        if len(content) <= room:
            return Rows([self.wrap(content)], full, False, full)
        if not windows:
            return Rows([self.wrap(content[:room])], limit, True, full)
        prefix, body = content[:prefix_len], content[prefix_len:]
        step = room - prefix_len
        rows = [self.wrap(prefix + body[i : i + step]) for i in range(0, len(body), step)]
        return Rows(rows, sum(len(r) for r in rows), False, full)
