"""nomic-embed-grpc server: a grpc.aio server that batches embedding requests onto one model."""

__version__ = "0.1.0"
