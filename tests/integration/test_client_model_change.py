"""Vectors of two models never mix: a server replaced mid-run by one of another model fails the stream (and the
CLI, which keeps its part), and --resume continues only a part of the same run and model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import EmbedClient, EmbedError
from client.files import NpyWriter
from tests.helpers.cli import ROOT, cli, feed, npy_rows, wait_for, write_run_record
from tools.checkpoint import TINY, write_tiny_nomic
from tools.servers import RunningServer, free_port, running_server


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_nomic(tmp_path_factory.mktemp("tiny-other"), seed=7, **TINY)


CHANGES = ["another-path", "weights-replaced-at-the-same-path", "config-edited-at-the-same-path",
           "another-input-limit"]


@pytest.mark.parametrize("change", CHANGES)
def test_a_server_replaced_by_another_model_fails_the_stream_and_the_cli(tiny_original: Path, other_model: Path,
                                                                         tmp_path: Path, change: str) -> None:
    """Another model at another path; or, as a deployment updates a model folder and restarts, other weights at
    the same path (one model_id and variant, another weights_digest), or the same weights under an edited
    config.json, or restarted with another input limit (the same weights_digest, another model_digest)."""
    port = free_port()
    out = tmp_path / "out.npy"
    part = out.with_name("out.npy.part")
    texts = [f"text {i} of the run" for i in range(200)]
    in_place = change != "another-path"
    model = shutil.copytree(tiny_original, tmp_path / "model") if in_place else tiny_original
    with running_server(str(model), port=port) as first:
        info_a = first.client().info()
        model_a = info_a.model_id
        client = EmbedClient(first.target)
        stream = iter(client.embed_stream(texts, batch_size=5, window=2))
        got = [next(stream) for _ in range(3)]
        app = subprocess.Popen([sys.executable, "-m", "client", "embed", "--target", first.target, "--input", "-",
                                "--output", str(out), "--batch-size", "5", "--quiet"],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        feed(app, texts[:100])
        wait_for(lambda: npy_rows(part, 128) >= 40)
    if change == "weights-replaced-at-the-same-path":
        shutil.copyfile(other_model / "model.safetensors", model / "model.safetensors")
    if change == "config-edited-at-the-same-path":  # the rotary base: every vector changes, the weights stay
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "rotary_emb_base": 10_000}))
    limit = {"max_input_tokens": 16} if change == "another-input-limit" else {}
    with running_server(str(model if in_place else other_model), port=port, **limit) as second:
        info_b = second.client().info()
        assert (info_b.model_id == model_a) is in_place and info_b.model_digest != info_a.model_digest
        assert (info_b.weights_digest == info_a.weights_digest) is change.endswith(("config-edited-at-the-same-path",
                                                                                    "another-input-limit"))
        feed(app, texts[100:])
        _, stderr = app.communicate(timeout=120)
        with pytest.raises(EmbedError) as caught:
            got.extend(stream)
        client.close()
    assert caught.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "model changed" in caught.value.details and "not be comparable" in caught.value.details
    assert all(b.model_id == model_a for b in got)
    assert app.returncode == 1 and "model changed" in stderr and "--resume" in stderr, stderr
    assert not out.exists() and npy_rows(part, 128) >= 40
    record = json.loads(part.with_name("out.npy.part.json").read_text())
    assert record["model_id"] == model_a and record["dimensions"] == 0
    assert record["weights_digest"] == info_a.weights_digest and len(info_a.weights_digest) == 16
    assert record["model_digest"] == info_a.model_digest and len(info_a.model_digest) == 16


def test_resume_refuses_a_part_of_another_run(tiny_server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(f"line {i}\n" for i in range(30)))
    out, part = tmp_path / "out.npy", tmp_path / "out.npy.part"
    sidecar = tmp_path / "out.npy.part.json"
    args = ("embed", "--target", tiny_server.target, "--input", str(source), "--output", str(out), "--quiet")
    with tiny_server.client() as client:
        rows = client.embed([f"line {i}" for i in range(10)], dimensions=64)
        model = client.info()
    writer = NpyWriter(out, np.dtype(np.float32), 64)  # as a run the record below describes leaves it
    writer.write([{"text": f"line {i}"} for i in range(10)], rows)
    assert writer.stop()
    no_record = cli(*args, "--dimensions", "64", "--resume")
    assert no_record.returncode == 1 and "no record" in no_record.stderr and part.exists()

    base = {"output_format": ".npy", "input_format": "auto", "dimensions": 64}
    write_run_record(part, **base, task="search_query")
    other_task = cli(*args, "--dimensions", "64", "--resume")
    assert other_task.returncode == 1 and "task='search_query'" in other_task.stderr, other_task.stderr
    write_run_record(part, **base, model_id="another-model", variant="fp32")
    other_model = cli(*args, "--dimensions", "64", "--resume")
    assert other_model.returncode == 1 and "another-model" in other_model.stderr, other_model.stderr
    assert "remove it to start over" in other_model.stderr and "--resume" not in other_model.stderr  # one advice
    assert np.array_equal(np.load(part), rows) and sidecar.exists()

    write_run_record(part, **base, model_id=model.model_id, variant=model.variant, weights_digest="0" * 16)
    other_weights = cli(*args, "--dimensions", "64", "--resume")
    assert other_weights.returncode == 1 and f"weights {'0' * 16}" in other_weights.stderr, other_weights.stderr
    assert np.array_equal(np.load(part), rows)
    write_run_record(part, **base, model_id=model.model_id, variant=model.variant,
                     weights_digest=model.weights_digest, model_digest="0" * 16)
    other_setup = cli(*args, "--dimensions", "64", "--resume")
    assert other_setup.returncode == 1 and f"model {'0' * 16}" in other_setup.stderr, other_setup.stderr
    assert np.array_equal(np.load(part), rows)

    # A record of a client that did not keep the digest: the model and variant decide.
    write_run_record(part, **base, model_id=model.model_id, variant=model.variant)
    resumed = cli(*args, "--dimensions", "64", "--resume")
    assert resumed.returncode == 0 and "resuming after 10 texts" in resumed.stderr, resumed.stderr
    assert not part.exists() and not sidecar.exists() and np.load(out).shape == (30, 64)


def test_a_run_records_its_parameters_beside_its_part(tiny_server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("".join(f"line {i}\n" for i in range(20)) + "far too long " * 30 + "\n")
    out, sidecar = tmp_path / "out.npy", tmp_path / "out.npy.part.json"
    args = ("embed", "--target", tiny_server.target, "--input", str(source), "--output", str(out), "--quiet",
            "--max-tokens", "20", "--batch-size", "5")
    failed = cli(*args, "--long-text-mode", "error")
    assert failed.returncode == 1
    record = json.loads(sidecar.read_text())
    with tiny_server.client() as client:
        assert record["model_id"] == client.info().model_id
    assert record["max_tokens"] == 20 and record["long_text_mode"] == "error"
    other_width = cli(*args, "--long-text-mode", "truncate", "--max-tokens", "30", "--resume")
    assert other_width.returncode == 1 and "max_tokens" in other_width.stderr
    done = cli(*args, "--long-text-mode", "truncate", "--resume")
    assert done.returncode == 0, done.stderr
    assert not sidecar.exists() and np.load(out).shape == (21, 128)


def test_the_rotary_scaling_factor_counts_only_where_inputs_may_pass_the_trained_length(tiny_original: Path) -> None:
    """TINY is trained on 16 positions: with an input limit of 16 no factor can change a vector."""
    digests = {}
    for limit, factor in [(16, 2.0), (16, 4.0), (0, 2.0), (0, 4.0)]:
        with running_server(str(tiny_original), max_input_tokens=limit, rotary_scaling_factor=factor) as srv:
            digests[limit, factor] = srv.client().info().model_digest
    assert digests[16, 2.0] == digests[16, 4.0]
    assert len({digests[16, 2.0], digests[0, 2.0], digests[0, 4.0]}) == 3
