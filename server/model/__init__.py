"""The model: finding and reading checkpoints, loading a variant, the device probe, the runner.

The only package that imports torch and transformers; it never imports grpc.
"""
