"""deploy/: the Kubernetes manifests and Dockerfiles agree with the server they run."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nomic_embed.v1 import embed_pb2
from quant.memory import ModelInfo, estimate
from quant.variants import get_variant
from server.config import ServerConfig, parse_args
from server.flag_values import parse_size

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent
SERVICE_NAME = embed_pb2.DESCRIPTOR.services_by_name["EmbedService"].full_name
# Full-size nomic-embed-text-v1.5: 12 layers of Wqkv, out_proj, fc11, fc12, fc2 (no biases), plus
# embeddings and LayerNorms.
FULL_SIZE = ModelInfo(parameters=136_731_648, linear_parameters=113_246_208, hidden_size=768,
                      mlp_width=2 * 3072, num_layers=12)
LONGEST_ROW = 8192
# Resident memory of the server process beyond the memory model (Python, torch, transformers, grpc):
# 437 MB measured with a 17 MB model, rounded up.
PROCESS_BASELINE = parse_size("512MiB")


def _documents(*paths: Path) -> list[dict[str, Any]]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def _rendered(overlay: str) -> list[dict[str, Any]]:
    """What `kubectl apply -k` would apply (kustomize is built into kubectl)."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: kustomize overlays are not rendered")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / overlay)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return [d for d in yaml.safe_load_all(out) if d]


BASE = _documents(*sorted((DEPLOY / "k8s").glob("*.yaml")))


def _server(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _config(container: dict[str, Any]) -> ServerConfig:
    """The server's config from the container's args and environment, as `python -m server` builds it."""
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    return parse_args(container["args"], env=env)


def _quantity(text: str) -> float:
    """A Kubernetes quantity: 3Gi, 512Mi, 4, 500m."""
    if text.endswith("m"):
        return int(text[:-1]) / 1000
    return parse_size(text.replace("i", "iB")) if text[-1].isalpha() else float(text)


def _grpc_port(container: dict[str, Any]) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"]
    return port


def _check_metrics_port(deployment: dict[str, Any]) -> None:
    """The server serves metrics on a named container port, and the pod tells Prometheus where."""
    container = _server(deployment)
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "metrics"]
    assert _config(container).metrics_port == port != _grpc_port(container)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_metrics_are_served_on_a_named_port_prometheus_is_told_of() -> None:
    _check_metrics_port(_kind(BASE, "Deployment"))


def test_probes_ask_the_health_service_on_the_grpc_port() -> None:
    container = _server(_kind(BASE, "Deployment"))
    port = _config(container).port
    assert _grpc_port(container) == port == 50051
    probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        assert probe["grpc"]["port"] == port, name
    assert probes["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert probes["livenessProbe"]["grpc"].get("service", "") == ""  # the server as a whole
    # Model loading gets far longer than a liveness failure would allow.
    startup = probes["startupProbe"]
    liveness = probes["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    assert startup["periodSeconds"] * startup["failureThreshold"] > liveness["periodSeconds"] * liveness[
        "failureThreshold"]


def test_the_service_is_headless_and_reaches_the_grpc_port() -> None:
    service = _kind(BASE, "Service")
    deployment = _kind(BASE, "Deployment")
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == _grpc_port(_server(deployment))
    assert port["targetPort"] in ("grpc", port["port"])


def test_the_termination_grace_period_outlasts_the_drain() -> None:
    pod = _kind(BASE, "Deployment")["spec"]["template"]["spec"]
    container = _server(_kind(BASE, "Deployment"))
    config = _config(container)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + config.grace_s


def test_connections_age_so_clients_rebalance() -> None:
    config = _config(_server(_kind(BASE, "Deployment")))
    assert 0 < config.max_connection_age_s <= 600
    assert config.max_connection_age_grace_s > 0


def test_resources_hold_the_memory_model_and_threads_match_the_cpus() -> None:
    container = _server(_kind(BASE, "Deployment"))
    config = _config(container)
    limits = container["resources"]["limits"]
    assert container["resources"]["requests"] == limits  # Guaranteed QoS: no eviction under node pressure
    assert config.threads == _quantity(limits["cpu"])
    assert config.max_memory_bytes is not None
    needed = estimate(get_variant("fp32"), FULL_SIZE, "cpu", config.max_batch_tokens, LONGEST_ROW)
    assert needed.total <= config.max_memory_bytes, needed.describe()
    assert config.max_memory_bytes + PROCESS_BASELINE <= _quantity(limits["memory"])


def test_pods_run_as_a_non_root_user_and_mount_the_model_read_only() -> None:
    pod = _kind(BASE, "Deployment")["spec"]["template"]["spec"]
    container = _server(_kind(BASE, "Deployment"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    model_dir = Path(_config(container).model)
    (model_mount,) = [m for m in mounts.values() if model_dir.is_relative_to(m["mountPath"])]
    assert model_mount["readOnly"] is True
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    declared = {d["metadata"]["name"] for d in BASE if d["kind"] == "PersistentVolumeClaim"}
    assert claims[model_mount["name"]] in declared


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_the_cuda_overlay_runs_on_one_gpu_with_valid_flags() -> None:
    docs = _rendered("k8s-cuda")
    container = _server(_kind(docs, "Deployment"))
    config = _config(container)
    assert config.device == "cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-cuda")
    assert config.threads == _quantity(container["resources"]["limits"]["cpu"])
    assert _grpc_port(container) == config.port
    pod = _kind(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > config.grace_s
    assert _kind(docs, "Service")["spec"]["clusterIP"] == "None"
    _check_metrics_port(_kind(docs, "Deployment"))


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in logical.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines
            if line and not line.startswith("#")]


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_run_the_server_unprivileged(name: str) -> None:
    steps = _instructions(DEPLOY / name)
    for instruction, args in steps:
        if instruction == "COPY" and not args.startswith("--from"):
            *sources, _ = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path in the build context"
    values = {instruction: args for instruction, args in steps}  # the last of each
    assert values["USER"].split(":")[0] not in ("0", "root")
    assert int(values["EXPOSE"]) == ServerConfig().port == _grpc_port(_server(_kind(BASE, "Deployment")))
    assert json.loads(values["ENTRYPOINT"]) == ["python", "-m", "server"]
    config = parse_args(json.loads(values["CMD"]), env={})
    assert config.device == ("cuda" if name.endswith("cuda") else "auto")
    assert Path(config.model).is_relative_to("/models")
