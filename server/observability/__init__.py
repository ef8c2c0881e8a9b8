"""Prometheus metrics and logs: what the server reports about itself."""
