"""TLS, mTLS and bearer tokens on a real server, with certificates made in the test."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tests.helpers.certs import Authority
from tests.helpers.servers import RunningServer, running_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = Authority("test CA"), Authority("someone else's CA")
    (folder / "ca.crt").write_bytes(ca.pem)
    server_cert, server_key = ca.issue("localhost", server=True).write(folder, "server")
    return {"folder": folder, "ca": ca, "ca_path": str(folder / "ca.crt"), "server_cert": server_cert,
            "server_key": server_key, "client": ca.issue("client", server=False),
            "stranger": other.issue("stranger", server=False)}


def _embed(channel: grpc.Channel) -> int:
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    reply = stub.Embed(pb.EmbedRequest(texts=["secure hello"], task=pb.TASK_SEARCH_QUERY), timeout=10)
    channel.close()
    return len(reply.embeddings[0].values)


def test_tls(tiny_original: Path, pki: dict) -> None:
    with running_server(str(tiny_original), tls_cert=pki["server_cert"], tls_key=pki["server_key"]) as srv:
        secure = grpc.secure_channel(f"localhost:{srv.port}", grpc.ssl_channel_credentials(pki["ca"].pem))
        assert _embed(secure) == 128
        with pytest.raises(grpc.RpcError) as info:
            _embed(grpc.insecure_channel(srv.target))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_ca(tiny_original: Path, pki: dict) -> None:
    with running_server(str(tiny_original), tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                        tls_client_ca=pki["ca_path"]) as srv:
        target = f"localhost:{srv.port}"
        client = pki["client"]
        good = grpc.ssl_channel_credentials(pki["ca"].pem, private_key=client.key, certificate_chain=client.cert)
        assert _embed(grpc.secure_channel(target, good)) == 128
        stranger = pki["stranger"]
        for creds in (grpc.ssl_channel_credentials(pki["ca"].pem),
                      grpc.ssl_channel_credentials(pki["ca"].pem, private_key=stranger.key,
                                                   certificate_chain=stranger.cert)):
            with pytest.raises(grpc.RpcError) as info:
                _embed(grpc.secure_channel(target, creds))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_tokens(tiny_original: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# service tokens\nfirst-token\n\nsecond-token\n")
    with running_server(str(tiny_original), auth_token_file=str(token_file), auth_tokens_env="env-token") as srv:
        channel = srv.channel()
        stub = embed_pb2_grpc.EmbedServiceStub(channel)
        request = pb.EmbedRequest(texts=["x"], task=pb.TASK_SEARCH_QUERY)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "first-token"),)):
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(request, metadata=metadata, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.EmbedStream(iter([pb.EmbedStreamRequest(id="1", request=request)]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for token in ("first-token", "second-token", "env-token"):
            reply = stub.Embed(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert len(reply.embeddings) == 1
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_texts_never_reach_the_logs(tiny_server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    secret = "confidential-patient-record-1234"
    stub = embed_pb2_grpc.EmbedServiceStub(tiny_server.channel())
    with caplog.at_level("DEBUG"):
        stub.Embed(pb.EmbedRequest(texts=[secret], task=pb.TASK_SEARCH_DOCUMENT), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(texts=[secret], task=pb.TASK_SEARCH_DOCUMENT, dimensions=3), timeout=10)
    assert secret not in caplog.text
