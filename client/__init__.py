"""Python client of nomic-embed-grpc: blocking (EmbedClient) and asyncio (AsyncEmbedClient)."""

from client.aio import AsyncEmbedClient
from client.blocking import EmbedStream
from client.connection import Tls
from client.embed_client import EmbedClient
from client.errors import EmbedError
from client.options import Encoding, LongTextMode, Task
from client.results import EmbeddedBatch, ServerInfo
from client.retry import RetryPolicy
from client.stream import AsyncEmbedStream, StreamStats

__all__ = ["AsyncEmbedClient", "AsyncEmbedStream", "EmbedClient", "EmbedError", "EmbedStream", "EmbeddedBatch",
           "Encoding", "LongTextMode", "RetryPolicy", "ServerInfo", "StreamStats", "Task", "Tls"]
