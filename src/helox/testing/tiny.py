"""Tiny configs over slices of the bundled corpus, for tests and smoke runs (seconds on a CPU)."""

from __future__ import annotations

import json
import lzma
import random
from pathlib import Path

from helox.config import RunConfig, apply_override, validate_config
from helox.data.tokenizer import train_bpe
from helox.resources import corpus_dir, recipes_dir

CORPUS = corpus_dir()
QUICKSTART = recipes_dir() / "quickstart.yaml"


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


def write_mixed_corpus(out_dir: Path, train_per_domain: int = 60, val_per_domain: int = 8,
                       noise_documents: int = 0, seed: int = 0) -> tuple[Path, Path]:
    """JSONL train/val files with the first documents of every corpus domain (the bundled
    files are ordered by domain), plus an optional `noise` domain: tokens drawn uniformly from
    a 512-token BPE of the other documents, then decoded. Nothing in it is predictable beyond
    its token frequencies, so its loss stays near where every domain starts (~6 nats) while
    the text domains' falls: a domain that stays hard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    splits = {}
    for split, per_domain in (("train", train_per_domain), ("val", val_per_domain)):
        taken: dict[str, list[dict]] = {}
        with lzma.open(CORPUS / f"{split}.jsonl.xz", "rt") as f:
            for line in f:
                doc = json.loads(line)
                bucket = taken.setdefault(doc["domain"], [])
                if len(bucket) < per_domain:
                    bucket.append(doc)
        splits[split] = [doc for domain in sorted(taken) for doc in taken[domain]]
    tokenizer = train_bpe((doc["text"] for doc in splits["train"]), 512, 2, "<|endoftext|>")
    token_ids = range(1, tokenizer.get_vocab_size())  # 0 is the end-of-document token
    paths = []
    for split, docs in splits.items():
        count = noise_documents if split == "train" else -(-noise_documents // 8)
        for i in range(count):
            text = tokenizer.decode([rng.choice(token_ids) for _ in range(300)])
            docs.append({"id": f"noise/{split}/{i}", "text": text, "domain": "noise"})
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
        paths.append(path)
    return paths[0], paths[1]


def tiny_mixed_config(workspace: Path, overrides: list[str] = (), noise_documents: int = 24,
                      **corpus_kwargs) -> RunConfig:
    """The tiny config over every corpus domain (and optionally a `noise` domain)."""
    train_path, val_path = write_mixed_corpus(workspace / "mixed-corpus",
                                              noise_documents=noise_documents, **corpus_kwargs)
    raw = tiny_raw_config(workspace)
    raw["name"] = "tiny-mixed"
    raw["data"] = {"name": "tiny-mixed", "train": [{"path": str(train_path)}],
                   "val": [{"path": str(val_path)}]}
    for override in overrides:
        problem = apply_override(raw, override)
        if problem:
            raise ValueError(problem)
    return validate_config(raw, source="tiny mixed config")
