"""Helox: an open LLM training stack on PyTorch.

The public API (helox.api) is imported on first use, so that `import helox.model.llama` or the
`helox` command's start does not load the whole stack:

    import helox
    result = helox.train(helox.load_config("quickstart"))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from helox.version import __version__

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from helox.config import RunConfig
    from helox.data.shards import DatasetVersion
    from helox.train.loop import TrainResult

# `helox.train` is the public function below, not the subpackage of the same name: the
# subpackage is imported first (its __init__ is empty), so that importing its modules later
# never rebinds the name. Import the subpackage's contents with `from helox.train.loop import`.
import_module("helox.train")

__all__ = ["__version__", "load_config", "prepare_dataset", "train", "load_trained_model",
           "export_model", "evaluate", "RunConfig", "ConfigError", "TrainedModel",
           "HeloxError"]

_EXPORTS = {"load_config": "helox.api", "prepare_dataset": "helox.api",
            "load_trained_model": "helox.api", "export_model": "helox.api",
            "evaluate": "helox.api", "RunConfig": "helox.config", "ConfigError": "helox.config",
            "TrainedModel": "helox.checkpoint", "HeloxError": "helox.errors"}


def train(config: RunConfig, dataset: DatasetVersion | None = None,
          run_dir: Path | None = None, until_step: int | None = None,
          console: Console | None = None) -> TrainResult:
    """Train (or resume) in `run_dir` (default WORKSPACE/runs/NAME), preparing the dataset
    first unless one is given (`helox.api.train`; defined here so the name is the function's,
    see above)."""
    return import_module("helox.api").train(config, dataset, run_dir, until_step, console)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'helox' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
