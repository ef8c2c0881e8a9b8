from __future__ import annotations

from pathlib import Path

import pytest

from server.engine.tokenization import TextTokenizer
from server.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_original: Path) -> TextTokenizer:
    return TextTokenizer(*load_tokenizer(tiny_original))


def test_template_and_prefix(tok: TextTokenizer) -> None:
    assert tok.special_tokens == 2 and tok.pad_id == 0
    content = tok.content_ids(["hello world"], "search_query: ")[0]
    assert tok.wrap(content) == [101, 3945, 1035, 23032, 1024, 7592, 2088, 102]
    assert tok.prefix_length("search_query: ") == 4 and tok.prefix_length("") == 0


def test_inline_and_parallel_encoding_agree(tok: TextTokenizer) -> None:
    texts = ["hello world", "", "Ünïcödé and 中文 and emoji 🙂", "word " * 600, "tab\tand\nnewline", "\u200b"]
    assert tok.content_ids(texts, "search_document: ") == tok.content_ids(texts, "search_document: ", parallel=True)


def test_no_truncation_or_padding_from_tokenizer_json(tok: TextTokenizer) -> None:
    for parallel in (False, True):
        content = tok.content_ids(["word " * 1000, "a"], "", parallel=parallel)
        assert [len(c) for c in content] == [1000, 1]


def test_rows_fit_truncate_and_window(tok: TextTokenizer) -> None:
    content = list(range(1000, 1030))  # 30 tokens: 4 of prefix, 26 of text
    fits = tok.to_rows(content, limit=32, prefix_len=4, windows=False)
    assert fits.rows == [[101, *content, 102]] and fits.tokens == 32 and not fits.truncated
    cut = tok.to_rows(content, limit=16, prefix_len=4, windows=False)
    assert cut.rows == [[101, *content[:14], 102]] and cut.truncated and cut.full_tokens == 32
    win = tok.to_rows(content, limit=16, prefix_len=4, windows=True)
    prefix, text = content[:4], content[4:]
    assert win.rows == [[101, *prefix, *text[i : i + 10], 102] for i in (0, 10, 20)]
    assert win.tokens == sum(len(r) for r in win.rows) and not win.truncated
    assert all(len(r) <= 16 for r in win.rows)
