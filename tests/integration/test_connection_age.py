"""--max-connection-age: the server closes aged connections so clients reconnect (and rebalance)."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from nomic_embed.v1 import embed_pb2, embed_pb2_grpc
from server.config import parse_args
from tools.servers import running_server


class StateLog:
    """Connectivity states a channel goes through, observed without forcing connections."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.states: list[grpc.ChannelConnectivity] = []
        self._changed = threading.Condition()
        channel.subscribe(self._record, try_to_connect=False)

    def _record(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self.states.append(state)
            self._changed.notify_all()

    def wait_for(self, state: grpc.ChannelConnectivity, after: int, timeout: float) -> bool:
        """True once `state` is seen at or beyond index `after` of the log."""
        with self._changed:
            return self._changed.wait_for(lambda: state in self.states[after:], timeout=timeout)


def _info(channel: grpc.Channel) -> embed_pb2.InfoResponse:
    return embed_pb2_grpc.EmbedServiceStub(channel).Info(embed_pb2.InfoRequest(), timeout=10)


def test_an_aged_connection_is_closed_and_the_next_call_reconnects(tiny_original: Path) -> None:
    with running_server(str(tiny_original), max_connection_age_s=0.3, max_connection_age_grace_s=1.0) as srv, \
            srv.channel() as channel:
        log = StateLog(channel)
        _info(channel)
        assert log.wait_for(grpc.ChannelConnectivity.READY, 0, timeout=5)
        ready_at = log.states.index(grpc.ChannelConnectivity.READY) + 1
        # GOAWAY after ~0.3 s (+-10% jitter): the channel leaves READY without any call failing.
        assert log.wait_for(grpc.ChannelConnectivity.IDLE, ready_at, timeout=5), log.states
        idle_at = log.states.index(grpc.ChannelConnectivity.IDLE, ready_at) + 1
        assert _info(channel).model_id == str(tiny_original)
        assert log.wait_for(grpc.ChannelConnectivity.READY, idle_at, timeout=5), log.states


def test_connections_do_not_age_when_the_age_is_zero(tiny_original: Path) -> None:
    with running_server(str(tiny_original), max_connection_age_s=0) as srv, srv.channel() as channel:
        log = StateLog(channel)
        _info(channel)
        assert log.wait_for(grpc.ChannelConnectivity.READY, 0, timeout=5)
        ready_at = log.states.index(grpc.ChannelConnectivity.READY) + 1
        assert not log.wait_for(grpc.ChannelConnectivity.IDLE, ready_at, timeout=1.5), log.states
        _info(channel)
        assert log.states[ready_at:] == []


def test_the_flags_set_the_age_and_refuse_negative_values() -> None:
    config = parse_args(["--max-connection-age", "60", "--max-connection-age-grace", "5"], env={})
    assert (config.max_connection_age_s, config.max_connection_age_grace_s) == (60, 5)
    assert parse_args([], env={"NOMIC_EMBED_MAX_CONNECTION_AGE": "0"}).max_connection_age_s == 0
    with pytest.raises(SystemExit):
        parse_args(["--max-connection-age", "-1"], env={})


def test_keepalive_pings_on_a_quiet_stream_are_welcome(tiny_original: Path) -> None:
    """A stream with nothing to say for a while (a caller whose texts come slowly), pinged every 6 s: grpc core's
    default takes a ping more often than every 5 minutes without data as abuse, and after two strikes closes the
    connection with GOAWAY too_many_pings. The server allows one every 5 s (the client pings every 10 s)."""
    options = [("grpc.keepalive_time_ms", 6_000), ("grpc.keepalive_timeout_ms", 5_000),
               ("grpc.http2.max_pings_without_data", 0)]  # keep pinging, as long as the stream is quiet
    release = threading.Event()

    def requests() -> object:
        yield embed_pb2.EmbedStreamRequest(id="1", request=embed_pb2.EmbedRequest(texts=["first"], task=1))
        release.wait(30)  # quiet for 22 s: 3 pings, the last of which (18 s) ended the connection before
        yield embed_pb2.EmbedStreamRequest(id="2", request=embed_pb2.EmbedRequest(texts=["second"], task=1))

    with running_server(str(tiny_original)) as srv, grpc.insecure_channel(srv.target, options=options) as channel:
        stream = embed_pb2_grpc.EmbedServiceStub(channel).EmbedStream(requests(), timeout=60)
        assert next(stream).id == "1"
        threading.Timer(22, release.set).start()
        assert [answer.id for answer in stream] == ["2"]  # the connection held through the quiet
