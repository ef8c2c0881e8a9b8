"""TLS, mTLS and bearer tokens on a real server, with certificates made in the test."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.errors import StartupError
from tests.helpers.certs import Authority
from tools.servers import RunningServer, running_server


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


def _start_fails(tmp_path: Path, **overrides: object) -> str:
    """The start's error; the model folder does not exist, so any other error comes before loading."""
    with pytest.raises(StartupError) as info, running_server(str(tmp_path / "no-model"), **overrides):
        pass
    return str(info.value)


def test_a_key_of_another_certificate_is_refused_naming_both_files(pki: dict, tmp_path: Path) -> None:
    _, other_key = pki["ca"].issue("localhost", server=True).write(tmp_path, "other")
    message = _start_fails(tmp_path, tls_cert=pki["server_cert"], tls_key=other_key)
    assert message == (f"the TLS key {other_key} (--tls-key) does not belong to the TLS certificate "
                       f"{pki['server_cert']} (--tls-cert)")


def test_an_encrypted_key_is_refused(pki: dict, tmp_path: Path) -> None:
    key = tmp_path / "encrypted.key"
    key.write_bytes(pki["ca"].key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.BestAvailableEncryption(b"secret")))
    message = _start_fails(tmp_path, tls_cert=pki["server_cert"], tls_key=str(key))
    assert message == f"the TLS key {key} (--tls-key) is encrypted; give an unencrypted PEM key"


@pytest.mark.parametrize(("setting", "flag", "what"), [
    ("tls_cert", "--tls-cert", "TLS certificate"), ("tls_key", "--tls-key", "TLS key"),
    ("tls_client_ca", "--tls-client-ca", "client CA")])
def test_missing_tls_files_are_named_with_their_flag(pki: dict, tmp_path: Path, setting: str, flag: str,
                                                     what: str) -> None:
    missing = str(tmp_path / "missing.pem")
    settings = {"tls_cert": pki["server_cert"], "tls_key": pki["server_key"], setting: missing}
    message = _start_fails(tmp_path, **settings)
    assert message == f"cannot read the {what} {missing} ({flag}): No such file or directory"


def test_files_that_are_not_pem_are_refused_naming_them(pki: dict, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert _start_fails(tmp_path, tls_cert=str(junk), tls_key=pki["server_key"]) == (
        f"the TLS certificate {junk} (--tls-cert) holds no PEM certificate")
    assert _start_fails(tmp_path, tls_cert=pki["server_cert"], tls_key=str(junk)) == (
        f"the TLS key {junk} (--tls-key) holds no PEM private key")
    assert _start_fails(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                        tls_client_ca=str(junk)) == f"the client CA {junk} (--tls-client-ca) holds no PEM certificate"


@pytest.mark.parametrize("tokens", [" , ", ""])
def test_auth_tokens_that_yield_no_token_refuse_to_start(tmp_path: Path, tokens: str) -> None:
    assert _start_fails(tmp_path, auth_tokens_env=tokens).startswith("NOMIC_EMBED_AUTH_TOKENS holds no token")


def test_a_token_file_that_is_not_text_is_refused(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_bytes(b"\xff\xfe token\n")
    assert _start_fails(tmp_path, auth_token_file=str(token_file)) == f"the token file {token_file} is not UTF-8 text"


@pytest.mark.parametrize(("start", "days", "when"), [(-3, 1, "expired on "), (2, 1, "is not valid before ")])
def test_a_certificate_outside_its_dates_is_refused(pki: dict, tmp_path: Path, start: float, days: float,
                                                   when: str) -> None:
    # It served, and every client's handshake failed, even one trusting that very certificate.
    cert, key = pki["ca"].issue("localhost", server=True, valid_from_days=start, valid_days=days).write(tmp_path, "s")
    message = _start_fails(tmp_path, tls_cert=cert, tls_key=key)
    assert message.startswith(f"the TLS certificate {cert} (--tls-cert) {when}")
    assert message.endswith(" UTC: every client would refuse it")
    expired_ca = tmp_path / "expired-ca.crt"
    expired_ca.write_bytes(pki["ca"].issue("old CA", server=False, valid_from_days=-3, valid_days=1).cert)
    message = _start_fails(tmp_path, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                           tls_client_ca=str(expired_ca))
    assert message.startswith(f"the client CA {expired_ca} (--tls-client-ca) expired on ")
    assert message.endswith(": no client certificate would be accepted")


def test_a_client_ca_that_is_not_a_ca_is_served_with_a_warning(tiny_original: Path, pki: dict, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # Only a client presenting that very certificate gets in, none it issued: pinning, or a mistake.
    leaf = tmp_path / "leaf.crt"
    leaf.write_bytes(pki["client"].cert)
    with running_server(str(tiny_original), tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                        tls_client_ca=str(leaf)):
        pass
    assert f"the client CA {leaf} (--tls-client-ca) holds CN=client, which is not a CA certificate" in caplog.text
