"""Serve: the Ray Serve retrieval application."""
