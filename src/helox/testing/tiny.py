"""Tiny configs over slices of the bundled corpus, for tests and smoke runs (seconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

from helox.config import RunConfig, apply_override, validate_config

REPO = Path(__file__).resolve().parents[3]
CORPUS = REPO / "corpus"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def tiny_raw_config(workspace: Path, train_documents: int = 400, val_documents: int = 40) -> dict:
    """A recipe dict: a 2-layer GQA model with a 512-token BPE over a slice of the corpus."""
    return {
        "name": "tiny",
        "workspace": str(workspace),
        "data": {"train": [{"path": str(CORPUS / "train.jsonl.xz"),
                            "max_documents": train_documents}],
                 "val": [{"path": str(CORPUS / "val.jsonl.xz"), "max_documents": val_documents}]},
        "tokenizer": {"vocab_size": 512},
        "model": {"d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "max_seq_len": 64},
        "train": {"seed": 7, "max_steps": 8, "micro_batch_size": 4, "grad_accum_steps": 1,
                  "seq_len": 32, "precision": "fp32", "compile": False,
                  "eval_every_steps": 4, "eval_batches": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "sample": {"prompts": ["In the"], "max_new_tokens": 8},
    }


def tiny_config(workspace: Path, overrides: list[str] = (), **kwargs) -> RunConfig:
    raw = tiny_raw_config(workspace, **kwargs)
    for override in overrides:
        problem = apply_override(raw, override)
        if problem:
            raise ValueError(problem)
    return validate_config(raw, source="tiny config")
