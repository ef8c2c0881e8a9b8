"""A CPU batch too small to share runs on one intra-op thread; a large one on all the configured threads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel

from server.model.rotary import PerRowNTKRotary
from server.model.runner import PARALLEL_MIN_FLOPS, Runner, flops_per_token, install_per_row_rotary
from server.model.spec import read_model_spec
from tests.conftest import TINY


def _runner(path: Path, device: str = "cpu", threads: int | None = 2) -> Runner:
    spec = read_model_spec(path, rotary_scaling_factor=2.0)
    model = AutoModel.from_pretrained(path, config=spec.config, dtype=torch.float32).eval()
    install_per_row_rotary(model, PerRowNTKRotary(spec.rotary))
    return Runner(model, pooling="mean", pad_id=0, device=device, per_row_rotary=True, threads=threads)


def test_flops_follow_the_encoder_shape(tiny_original: Path) -> None:
    runner = _runner(tiny_original)
    h, layers, inner = TINY["hidden"], TINY["layers"], TINY["inner"]
    assert flops_per_token(runner.model) == 2.0 * layers * (4 * h * h + 2 * h * inner)


def test_small_batches_take_one_thread_and_large_ones_all(tiny_original: Path) -> None:
    runner = _runner(tiny_original)
    small = [[101, 2000, 102]]
    large_tokens = int(PARALLEL_MIN_FLOPS / runner.flops_per_token) + 1
    large = [[101, *([2000] * 62), 102]] * (large_tokens // 64 + 1)
    assert runner.threads_for(small) == 1 and runner.threads_for(large) == 2
    before = torch.get_num_threads()
    try:
        runner.run(small)
        assert torch.get_num_threads() == 1
        runner.run(large)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_are_left_alone_off_the_cpu_or_unset(tiny_original: Path) -> None:
    assert _runner(tiny_original, device="cuda").threads is None
    assert _runner(tiny_original, threads=None).threads is None
