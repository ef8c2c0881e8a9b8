"""Measurement and test tools shipped with the server: checkpoint writer, quality and memory measurement."""
