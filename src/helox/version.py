"""Helox's version: read by the package metadata (pyproject.toml) and by exports that record
their producer, without importing the public API."""

__version__ = "0.1.0"
