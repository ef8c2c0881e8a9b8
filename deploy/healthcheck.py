"""Docker HEALTHCHECK: exit 0 when the server's embedding service answers SERVING, else 1.

Plaintext only, like Kubernetes' own gRPC probes; the port comes from NOMIC_EMBED_PORT (default 50051).
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICE = "nomic_embed.v1.EmbedService"


def main() -> int:
    target = f"127.0.0.1:{os.environ.get('NOMIC_EMBED_PORT', '50051')}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                                              timeout=4)
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
