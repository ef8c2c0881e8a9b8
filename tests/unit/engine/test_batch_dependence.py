"""Info states a batch-dependence bound for every CPU variant, and says so where nothing was measured."""

from __future__ import annotations

from quant.variants import VARIANTS
from server.engine import batch_dependence


def test_every_cpu_variant_has_a_stated_bound_above_what_was_measured() -> None:
    assert set(batch_dependence.CPU) == {name for name, v in VARIANTS.items() if "cpu" in v.devices}
    for name, stated in batch_dependence.CPU.items():
        assert stated.measured < stated.bound, name
        assert batch_dependence.describe(name, "cpu").startswith(f"up to {stated.bound:.0e} per component")


def test_what_was_not_measured_is_said() -> None:
    assert batch_dependence.describe("fp16", "cuda:0 (NVIDIA H200)") == "not measured for fp16 on cuda:0 (NVIDIA H200)"
    assert batch_dependence.describe("bf16", "cuda:0 (NVIDIA H200)") == "not measured for bf16 on cuda:0 (NVIDIA H200)"
