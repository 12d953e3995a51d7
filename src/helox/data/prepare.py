"""`helox data prepare`: sources → tokenizer → token shards → an immutable dataset version.

Preparing is cached by its inputs (data and tokenizer config plus the sha256 of every source
file), so `helox run` after `helox data prepare` reuses the version instead of rebuilding it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from tokenizers import Tokenizer

from helox.config import RunConfig, SourceConfig, sha256_json
from helox.data.shards import DatasetVersion, ShardWriter, build_manifest, version_id
from helox.fileio import fsync_path, sha256_file
from helox.data.sources import Document, read_documents
from helox.data.tokenizer import eos_id, load_tokenizer, train_bpe

ENCODE_BATCH_DOCUMENTS = 512

Progress = Callable[[str, int], None]
"""Called with (stage, documents done so far); lets the CLI draw a progress bar."""


def datasets_dir(config: RunConfig) -> Path:
    return config.workspace / "datasets"


def prepare_dataset(config: RunConfig, progress: Progress | None = None) -> DatasetVersion:
    """Build (or find the cached) dataset version for the recipe's data and tokenizer config."""
    root = datasets_dir(config)
    inputs_key = _inputs_key(config)
    cached = _cached_version(root, inputs_key)
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        dataset = _build(config, tmp_dir, progress or (lambda stage, done: None))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    (root / ".by-inputs").mkdir(exist_ok=True)
    (root / ".by-inputs" / inputs_key).write_text(dataset.version)
    return dataset


def _build(config: RunConfig, tmp_dir: Path, progress: Progress) -> DatasetVersion:
    tokenizer = _get_tokenizer(config, progress)
    tokenizer.save(str(tmp_dir / "tokenizer.json"))
    eos = eos_id(tokenizer, config.tokenizer.eos_token, config.tokenizer.path or "trained BPE")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    splits, writers = {}, {}
    for split, sources in (("train", config.data.train), ("val", config.data.val)):
        if not sources:
            continue
        writer = ShardWriter(tmp_dir, split, vocab_size, config.data.shard_size_tokens)
        for done, batch in enumerate(_batches(_documents(sources), ENCODE_BATCH_DOCUMENTS)):
            for doc, encoding in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
                writer.add(encoding.ids + [eos], doc.domain)
            progress(f"tokenizing {split}", (done + 1) * ENCODE_BATCH_DOCUMENTS)
        writer.flush()
        splits[split], writers[split] = writer.summary(), writer
    tokenizer_info = {"sha256": sha256_file(tmp_dir / "tokenizer.json"), "vocab_size": vocab_size,
                      "eos_token": config.tokenizer.eos_token, "eos_id": eos}
    manifest = build_manifest(tokenizer_info, writers["train"].dtype, splits,
                              writers["train"].token_counts)
    (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (tmp_dir / "lineage.json").write_text(json.dumps(_lineage(config), indent=1))
    return _publish(tmp_dir, datasets_dir(config) / version_id(manifest))


def _get_tokenizer(config: RunConfig, progress: Progress) -> Tokenizer:
    if config.tokenizer.path is not None:
        return load_tokenizer(config.tokenizer.path)
    texts = _counting((d.text for d in _documents(config.data.train)), progress, "training BPE")
    return train_bpe(texts, config.tokenizer.vocab_size, config.tokenizer.min_frequency,
                     config.tokenizer.eos_token)


def _publish(tmp_dir: Path, final_dir: Path) -> DatasetVersion:
    """Move the finished folder to its content address; an identical version may already exist."""
    for path in tmp_dir.iterdir():
        fsync_path(path)
    if final_dir.exists():
        return DatasetVersion(final_dir)
    os.rename(tmp_dir, final_dir)
    fsync_path(final_dir.parent)
    return DatasetVersion(final_dir)



def _documents(sources: list[SourceConfig]) -> Iterator[Document]:
    for source in sources:
        yield from read_documents(source)


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _counting(texts: Iterator[str], progress: Progress, stage: str) -> Iterator[str]:
    for done, text in enumerate(texts, start=1):
        if done % ENCODE_BATCH_DOCUMENTS == 0:
            progress(stage, done)
        yield text


def _inputs_key(config: RunConfig) -> str:
    sources = [*config.data.train, *config.data.val]
    files = [sha256_file(s.path) for s in sources]
    if config.tokenizer.path is not None:
        files.append(sha256_file(config.tokenizer.path))
    return sha256_json({"data": config.data.model_dump(mode="json"),
                        "tokenizer": config.tokenizer.model_dump(mode="json"), "files": files})


def _cached_version(root: Path, inputs_key: str) -> DatasetVersion | None:
    pointer = root / ".by-inputs" / inputs_key
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return DatasetVersion(path) if (path / "manifest.json").is_file() else None


def _lineage(config: RunConfig) -> dict:
    def describe(sources: list[SourceConfig]) -> list[dict]:
        return [{"path": str(s.path), "sha256": sha256_file(s.path)} for s in sources]

    return {"parents": [], "sources": {"train": describe(config.data.train),
                                       "val": describe(config.data.val)},
            "data_config": config.data.model_dump(mode="json"),
            "tokenizer_config": config.tokenizer.model_dump(mode="json")}
