"""gRPC transport: proto <-> domain, the status table, interceptors, security, trailers.

The only package that imports grpc (server.app wires it); it never imports torch.
"""
