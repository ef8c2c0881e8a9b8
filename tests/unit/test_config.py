from __future__ import annotations

import pytest

from server.config import DEFAULT_MODEL, DEFAULT_PORT, parse_args, parse_size


def test_defaults() -> None:
    config = parse_args([], env={})
    assert (config.model, config.port, config.variant) == (DEFAULT_MODEL, DEFAULT_PORT, "auto")
    assert config.rotary_scaling_factor == 2.0


def test_flags_and_environment() -> None:
    config = parse_args(["--port", "9000", "--max-memory", "1.5GiB"], env={"NOMIC_EMBED_VARIANT": "fp32",
                                                                           "NOMIC_EMBED_PORT": "7000"})
    assert config.port == 9000 and config.variant == "fp32" and config.max_memory_bytes == int(1.5 * 2**30)


@pytest.mark.parametrize(("text", "size"), [("800MiB", 800 * 2**20), ("2GB", 2 * 10**9), ("1024", 1024)])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-batch-rows", "0"], ["--max-memory", "lots"]])
def test_bad_flags_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, env={})
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err
