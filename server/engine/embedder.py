"""From texts and options to embeddings: tokenize on admission, batch, then the Matryoshka steps."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from server.domain import Embedding, EmbedOptions, EmbedResult, LongTextMode, ModelFacts, Task, Timings
from server.engine import matryoshka
from server.engine.batcher import Batcher
from server.engine.matryoshka import Finish
from server.engine.tokenization import Rows, TextTokenizer
from server.errors import InvalidInput, ModelFailure, NonFiniteVector

# Tokenizing a few short texts is faster inline than a hop to a thread.
_INLINE_TOKENIZE_CHARS = 20_000


class Embedder:
    def __init__(self, tokenizer: TextTokenizer, batcher: Batcher, facts: ModelFacts,
                 on_result: Callable[[EmbedResult], None] | None = None,
                 max_request_tokens: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_request_tokens = max_request_tokens
        self.batcher = batcher
        self.facts = facts
        self.on_result = on_result  # e.g. metrics: sees every computed result

    def prefix(self, task: Task) -> str:
        return task.prefix if self.facts.task_prefixes else ""

    async def token_ids(self, texts: Sequence[str], task: Task) -> list[list[int]]:
        """Full token ids (special tokens included, nothing truncated) per text, within the request token limit."""
        content = await self._content_ids(texts, self.prefix(task))
        ids = [self.tokenizer.wrap(c) for c in content]
        self._check_request_tokens(sum(map(len, ids)), "split the batch")
        return ids

    async def embed(self, texts: Sequence[str], options: EmbedOptions,
                    deadline: float | None = None, caller: Hashable = None) -> EmbedResult:
        """The texts' vectors; `caller` (any key) is who sent them, for the queue's turns."""
        arrived = time.monotonic()
        prefix = self.prefix(options.task)
        content = await self._content_ids(texts, prefix)
        prefix_len = self.tokenizer.prefix_length(prefix)
        per_text: list[Rows] = []
        windows = options.long_text_mode is LongTextMode.MEAN
        for i, ids in enumerate(content):
            if len(ids) <= prefix_len:  # e.g. only zero-width or control characters, which the tokenizer drops
                raise InvalidInput(f"texts[{i}]", "no tokens: the tokenizer drops every character of this text")
            rows = self.tokenizer.to_rows(ids, limit=options.max_tokens, prefix_len=prefix_len, windows=windows)
            if rows.truncated and options.long_text_mode is LongTextMode.ERROR:
                raise InvalidInput(
                    f"texts[{i}]",
                    f"{rows.full_tokens} tokens exceed max_tokens {options.max_tokens} "
                    "(long_text_mode ERROR; use TRUNCATE or MEAN, or shorten the text)",
                )
            per_text.append(rows)
        self._check_request_tokens(sum(rows.tokens for rows in per_text),
                                   "split the batch (several requests, or several messages of one stream)")
        flat = [row for rows in per_text for row in rows.rows]
        # Texts of one row each (nearly always) come back finished from the model thread; windows are
        # averaged here first.
        layer_norm = self.facts.layer_norm_before_truncation
        whole = len(flat) == len(per_text)
        job = self.batcher.submit(flat, deadline, Finish(options.dimensions, layer_norm) if whole else None, caller)
        try:
            vectors = await job.result()
        except asyncio.CancelledError:
            job.cancel()
            raise
        except NonFiniteVector as error:  # name the text, not the model row (a text may have several windows)
            text = bisect.bisect_right(list(itertools.accumulate(len(r.rows) for r in per_text)), error.row)
            raise ModelFailure(f"texts[{text}]: the model gave this text a vector with NaN, infinity or no "
                               "direction; no vector is returned for it") from None
        if not whole:
            vectors = self._average_windows(vectors, per_text, options.dimensions, layer_norm)
        embeddings = [Embedding(vector=vector, tokens=rows.tokens, truncated=rows.truncated, windows=len(rows.rows))
                      for vector, rows in zip(vectors, per_text, strict=True)]
        timings = Timings(job.queue_s, job.inference_s, time.monotonic() - arrived)
        result = EmbedResult(embeddings, timings)
        if self.on_result:
            self.on_result(result)
        return result

    @staticmethod
    def _average_windows(pooled: np.ndarray, per_text: list[Rows], dimensions: int,
                         layer_norm: bool) -> np.ndarray:
        """Each text's window vectors averaged by their token counts, then finished."""
        vectors = []
        start = 0
        for rows in per_text:
            n = len(rows.rows)
            vector = pooled[start] if n == 1 else matryoshka.weighted_mean(pooled[start : start + n],
                                                                           [len(r) for r in rows.rows])
            start += n
            vectors.append(vector)
        return matryoshka.finish_rows(np.stack(vectors), dimensions, layer_norm=layer_norm)

    def _check_request_tokens(self, total: int, advice: str) -> None:
        if self.max_request_tokens is not None and total > self.max_request_tokens:
            raise InvalidInput("texts", f"{total} tokens exceed the limit of {self.max_request_tokens} tokens "
                                        f"per request; {advice}")

    async def _content_ids(self, texts: Sequence[str], prefix: str) -> list[list[int]]:
        if sum(len(t) for t in texts) > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.tokenizer.content_ids, texts, prefix, parallel=True)
        # Inline. While the model keeps up, text by text holding the interpreter lock: the cheapest for the
        # event loop. Once the queue is backlogged the model is what limits the server, so tokenizing lets go
        # of the lock (and of the CPU) for the model thread: on 2 cores at 256 callers that served 27% more
        # requests per second (docs/benchmarks.md, "Host cost").
        return self.tokenizer.content_ids(texts, prefix, parallel=self.batcher.backlogged)

