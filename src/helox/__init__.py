"""Helox: an open LLM training stack on PyTorch."""

__version__ = "0.1.0"
