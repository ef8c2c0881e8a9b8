"""Out of memory mid-batch: the batch is split and retried, only a text that never fits fails.

The server runs for real on loopback; its device allocator is given a hard limit (tests/helpers/memory_cap)
that raises torch.OutOfMemoryError inside the forward, as CUDA's allocator does.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.model.runner import is_out_of_memory
from tests.helpers.memory_cap import MemoryCap, capped
from tools.servers import running_server, scrape_metrics

# On the tiny model one row of ~36 tokens peaks at ~37 kB per tensor, eight such rows at ~295 kB and a
# row of ~200 tokens at ~211 kB: with this limit two rows fit at once, four do not, the long row never.
LIMIT_BYTES = 100_000
SHORT = [f"short text number {i} " + "word " * 25 for i in range(8)]
LONG = "a long text " + "word " * 200


def test_the_cpu_allocators_failure_counts_as_out_of_memory() -> None:
    with pytest.raises(RuntimeError) as failure:
        torch.empty(2**50, dtype=torch.uint8)  # a real allocation failure, not a made-up one
    assert is_out_of_memory(failure.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("message", [
    # As the CUDA runtime, the driver, cuDNN and C++ word it (torch raises them as RuntimeError).
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call",
    "CUDA driver error: out of memory",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "std::bad_alloc",
])
def test_other_runtimes_running_out_count_as_out_of_memory(message: str) -> None:
    assert is_out_of_memory(RuntimeError(message))


def test_a_batch_out_of_memory_is_split_and_only_the_text_that_never_fits_fails(tiny_original: Path) -> None:
    with running_server(str(tiny_original), metrics_port=0) as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())

        def embed(texts: list[str]) -> pb.EmbedResponse:
            return stub.Embed(pb.EmbedRequest(texts=texts, task=pb.TASK_SEARCH_QUERY), timeout=30)

        expected = np.array([e.values for e in embed(SHORT).embeddings])  # without a limit
        runner, batcher = srv.app.loaded.runner, srv.app.loaded.batcher
        cap = MemoryCap(LIMIT_BYTES)
        runner.compute_context = capped(runner.compute_context, cap)

        with ThreadPoolExecutor(3) as pool:  # all at once: the batches mix them
            whole = pool.submit(embed, SHORT)
            doomed = pool.submit(embed, [SHORT[0], LONG])
            alone = pool.submit(embed, [LONG])
            got = np.array([e.values for e in whole.result().embeddings])
            for future in (doomed, alone):
                with pytest.raises(grpc.RpcError) as refused:
                    future.result()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "tokens) does not fit in the device's free memory even alone" in refused.value.details()

        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert batcher.totals.oom_splits >= 2  # eight rows -> four -> two
        assert batcher.totals.oom_rows == 2
        assert cap.largest > LIMIT_BYTES  # the limit was reached for real, inside the forward

        # The server stays up and serving; later batches stay within the lowered budget.
        health = health_pb2_grpc.HealthStub(srv.channel())
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        splits = batcher.totals.oom_splits
        again = np.array([e.values for e in embed(SHORT).embeddings])
        np.testing.assert_allclose(again, expected, atol=1e-6)
        assert batcher.totals.oom_splits == splits

        m = scrape_metrics(srv.app.metrics_port)
        assert m[("nomic_embed_batch_oom_splits_total", ())] == splits
        assert m[("nomic_embed_batch_token_budget", ())] < srv.app.loaded.limits.max_batch_tokens
