"""Python client of nomic-embed-grpc."""

from client.embed_client import EmbedClient, EmbedError, ServerInfo, Task

__all__ = ["EmbedClient", "EmbedError", "ServerInfo", "Task"]
