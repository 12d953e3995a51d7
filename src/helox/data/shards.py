"""Binary token shards, their manifest, and content-addressed dataset versions.

A dataset version is a folder `<workspace>/datasets/<version>/` holding
  tokenizer.json                  the tokenizer the shards were made with
  <split>-<domain>-<5 digits>.bin little-endian token ids (uint16; uint32 for big vocabularies),
                                  every document followed by the end-of-document token; a shard
                                  holds the documents of one domain
  <split>-<domain>-<5 digits>.mask chat datasets: per token, 1 if the loss is taken on it
  chat_template.json              chat datasets: the template the conversations were rendered in
  manifest.json                   per shard: file, sha256, domain, tokens, documents (and mask)
  lineage.json                    how it was built (sources and their hashes, config); not hashed
The version id is the sha256 of the canonical manifest JSON (first 16 hex digits): the same
tokens and tokenizer always give the same id, and any change gives another one.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helox.errors import HeloxError
from helox.fileio import sha256_file, sha256_json

MANIFEST_FORMAT = 2  # 2: one series of shards per domain
MASK_SUFFIX = ".mask"
"""Beside a shard of a chat dataset: one uint8 per token, 1 where it is trained as a target."""
VERSION_ID_HEX_DIGITS = 16


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")



@dataclass
class ShardWriter:
    """Accumulates tokenized documents of one split and cuts them into shard files, one series
    of shards per domain so that the loader can draw each domain at its own rate.

    A document never straddles two shards; a shard is closed once it holds `shard_size_tokens`.
    With `masked`, every addition comes with its per-token trained flags, written to a mask
    file beside the shard; a `tail_token` ends every shard (chat rows: see data/chat.py).
    """

    out_dir: Path
    split: str
    vocab_size: int
    shard_size_tokens: int
    masked: bool = False
    tail_token: int | None = None
    shards: list[dict] = field(default_factory=list)
    _pending: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _pending_masks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _pending_documents: Counter = field(default_factory=Counter)
    _pending_tokens: Counter = field(default_factory=Counter)
    _shards_per_domain: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.dtype = token_dtype(self.vocab_size)
        self.token_counts = np.zeros(self.vocab_size, dtype=np.int64)

    def add(self, token_ids: list[int] | np.ndarray, domain: str,
            trained: np.ndarray | None = None, documents: int = 1) -> None:
        """Append tokens (`documents` documents of them) to the domain's open shard."""
        if (trained is not None) != self.masked:
            raise ValueError("a masked writer takes trained flags with every addition, "
                             "an unmasked one none")
        array = np.asarray(token_ids, dtype=self.dtype)
        self._pending.setdefault(domain, []).append(array)
        if trained is not None:
            self._pending_masks.setdefault(domain, []).append(np.asarray(trained, np.uint8))
        self._pending_tokens[domain] += len(array)
        self._pending_documents[domain] += documents
        if self._pending_tokens[domain] >= self.shard_size_tokens:
            self._flush_domain(domain)

    def flush(self) -> None:
        for domain in sorted(self._pending):
            self._flush_domain(domain)
        self.shards.sort(key=lambda shard: shard["file"])

    def _flush_domain(self, domain: str) -> None:
        pieces = self._pending.pop(domain, [])
        if not pieces:
            return
        masks = self._pending_masks.pop(domain, [])
        if self.tail_token is not None:
            pieces.append(np.asarray([self.tail_token], dtype=self.dtype))
            masks.append(np.zeros(1, np.uint8))
        tokens = np.concatenate(pieces)
        path = self.out_dir / f"{self.split}-{domain}-{self._shards_per_domain[domain]:05d}.bin"
        tokens.tofile(path)
        self.token_counts += np.bincount(tokens, minlength=len(self.token_counts))
        entry = {"file": path.name, "sha256": sha256_file(path), "domain": domain,
                 "num_tokens": int(len(tokens)),
                 "num_documents": int(self._pending_documents.pop(domain))}
        if self.masked:
            mask = path.with_suffix(MASK_SUFFIX)
            np.concatenate(masks).tofile(mask)
            entry["mask"] = {"file": mask.name, "sha256": sha256_file(mask),
                             "trained_tokens": int(sum(m.sum() for m in masks))}
        self.shards.append(entry)
        self._shards_per_domain[domain] += 1
        self._pending_tokens[domain] = 0

    def summary(self) -> dict:
        domain_tokens: Counter = Counter()
        domain_documents: Counter = Counter()
        for shard in self.shards:
            domain_tokens[shard["domain"]] += shard["num_tokens"]
            domain_documents[shard["domain"]] += shard["num_documents"]
        return {
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "domain_tokens": dict(sorted(domain_tokens.items())),
            "domain_documents": dict(sorted(domain_documents.items())),
            "shards": self.shards,
        }


def unigram_entropy_nats(token_counts: np.ndarray) -> float:
    """Entropy of the token frequency distribution: the loss of the best context-free model."""
    counts = token_counts[token_counts > 0].astype(np.float64)
    probs = counts / counts.sum()
    return float(-(probs * np.log(probs)).sum())


def version_id(manifest: dict) -> str:
    return sha256_json(manifest)[:VERSION_ID_HEX_DIGITS]


class DatasetVersion:
    """A prepared, immutable dataset folder (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise HeloxError(f"{self.path}: not a dataset version (no manifest.json)",
                             hint="prepare it with `helox data prepare RECIPE`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise HeloxError(f"{self.path}: dataset format {self.manifest.get('format')}, this "
                             f"Helox reads format {MANIFEST_FORMAT} (one shard series per domain)",
                             hint="prepare the dataset again with `helox data prepare RECIPE`")
        self.version = version_id(self.manifest)

    @property
    def lineage(self) -> dict:
        """Name, parents, sources, pipeline config and step statistics (lineage.json)."""
        return _read_json_or_empty(self.path / "lineage.json")

    @property
    def report(self) -> dict:
        """What each pipeline step kept and removed, per split (report.json)."""
        return _read_json_or_empty(self.path / "report.json")

    @property
    def name(self) -> str:
        return self.lineage.get("name", "default")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def eos_id(self) -> int:
        return self.manifest["tokenizer"]["eos_id"]

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def chat(self) -> dict | None:
        """A chat dataset's template, what it trains on and its row length; None for text."""
        return self.manifest.get("chat")

    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> dict:
        if name not in self.manifest["splits"]:
            raise HeloxError(f"dataset {self.version} has no '{name}' split",
                             hint="add sources for it to the recipe's data section")
        return self.manifest["splits"][name]

    def domains(self, split: str) -> list[str]:
        """Domains with documents in `split`, sorted."""
        return sorted(self.split(split)["domain_tokens"])

    def shard_paths(self, split: str, domain: str | None = None) -> list[Path]:
        """Shard files of `split` (of one domain, if given), in file-name order."""
        return [self.path / shard["file"] for shard in self.split(split)["shards"]
                if domain is None or shard["domain"] == domain]

    def documents(self, split: str, domain: str | None = None) -> Iterator[np.ndarray]:
        """Token ids of each non-empty document of `split` (of one domain), without its EOS."""
        for path in self.shard_paths(split, domain):
            yield from self.shard_documents(path)

    def shard_documents(self, path: Path) -> Iterator[np.ndarray]:
        """The documents of one shard file: the runs of tokens between EOS tokens."""
        tokens = np.fromfile(path, dtype=self.dtype)
        ends = np.flatnonzero(tokens == self.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1])
        for start, end in zip(starts, ends):
            if end > start:
                yield tokens[start:end]

    def verify(self) -> list[str]:
        """Re-checksum the tokenizer and every shard; return the names of files that differ."""
        bad = []
        if sha256_file(self.tokenizer_path) != self.manifest["tokenizer"]["sha256"]:
            bad.append(self.tokenizer_path.name)
        chat = self.chat
        if chat is not None:
            template = self.path / chat["template_file"]
            if not template.is_file() or sha256_file(template) != chat["template_sha256"]:
                bad.append(chat["template_file"])
        for split in self.splits():
            for shard in self.split(split)["shards"]:
                for entry in (shard, shard.get("mask")):
                    path = None if entry is None else self.path / entry["file"]
                    if path is not None and (not path.is_file()
                                             or sha256_file(path) != entry["sha256"]):
                        bad.append(entry["file"])
        return bad


def _read_json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_manifest(tokenizer_info: dict, dtype: np.dtype, splits: dict[str, dict],
                   train_token_counts: np.ndarray, chat: dict | None = None) -> dict:
    return {**({"chat": chat} if chat is not None else {}),
        "format": MANIFEST_FORMAT,
        "dtype": dtype.str,
        "tokenizer": tokenizer_info,
        "splits": splits,
        "stats": {"unigram_entropy_nats": round(unigram_entropy_nats(train_token_counts), 6),
                  "unigram_entropy_bits": round(unigram_entropy_nats(train_token_counts)
                                                / math.log(2), 6)},
    }
