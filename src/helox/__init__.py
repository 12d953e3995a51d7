"""Helox: an open LLM training stack on PyTorch.

The public API (helox.api) is imported on first use, so that `import helox.model.llama` or the
`helox` command's start does not load the whole stack:

    import helox
    result = helox.train(helox.load_config("quickstart"))
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from helox.version import __version__

__all__ = ["__version__", "load_config", "prepare_dataset", "train", "load_trained_model",
           "export_model", "evaluate", "RunConfig", "ConfigError", "TrainedModel",
           "HeloxError"]

_EXPORTS = {"load_config": "helox.api", "prepare_dataset": "helox.api", "train": "helox.api",
            "load_trained_model": "helox.api", "export_model": "helox.api",
            "evaluate": "helox.api", "RunConfig": "helox.config", "ConfigError": "helox.config",
            "TrainedModel": "helox.checkpoint", "HeloxError": "helox.errors"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'helox' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
