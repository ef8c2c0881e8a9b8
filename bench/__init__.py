"""Benchmarks of the server against in-process baselines (`make bench`)."""
