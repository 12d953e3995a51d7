"""Trained tiny runs that the export tests convert (trained, so logits are not near-uniform and
a wrong permutation or quantization shows)."""

import pytest
from rich.console import Console

from helox.testing.tiny import tiny_config
from helox.training.loop import train

EXPORT_RUN_OVERRIDES = ["train.max_steps=40", "checkpoint.every_steps=40",
                        "train.eval_every_steps=0", "model.max_seq_len=128"]


@pytest.fixture(scope="session")
def export_run(tiny_dataset, workspace, tmp_path_factory):
    """GQA (4 query heads, 2 key-value heads), tied embeddings: the default model."""
    run_dir = tmp_path_factory.mktemp("export") / "tied"
    train(tiny_config(workspace, EXPORT_RUN_OVERRIDES), run_dir, tiny_dataset,
          console=Console(quiet=True))
    return run_dir


@pytest.fixture(scope="session")
def untied_run(tiny_dataset, workspace, tmp_path_factory):
    """Full multi-head attention with a separate output matrix."""
    run_dir = tmp_path_factory.mktemp("export") / "untied"
    config = tiny_config(workspace, [*EXPORT_RUN_OVERRIDES, "model.tie_embeddings=false",
                                     "model.num_kv_heads=4"])
    train(config, run_dir, tiny_dataset, console=Console(quiet=True))
    return run_dir
