"""A bounded loopback load generator for the embedding server."""
