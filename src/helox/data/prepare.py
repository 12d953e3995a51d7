"""`helox data prepare`: sources → cleaning pipeline → tokenizer → token shards → a version.

Per split: the sources still allowed (trust and expiry, judged on `data.as_of`) are read, the
`data.pipeline` steps clean them, the kept documents go to a scratch JSONL file; the tokenizer is
trained on (or loaded for) the cleaned training text; the documents are encoded into shards.
Next to the manifest the version keeps `report.json` (every step's counts), `removed.jsonl`
(every removed document with step and reason) and `lineage.json`.

Preparing is cached by its inputs (config, the sha256 of every input file and the data code),
so `helox run` after `helox data prepare` reuses the version instead of rebuilding it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from tokenizers import Tokenizer

from helox.chat.templates import TEMPLATE_FILE
from helox.data import access, versions
from helox.data.chat import (CONVERSATION_KEY, ChatEncoder, PackStats, chat_pipeline,
                             pack_conversations, pack_pairs, resolve_template)
from helox.data.config import DataConfig, TokenizerConfig
from helox.data.pipeline import StepStats, batched, reporting, run_pipeline
from helox.data.shards import DatasetVersion, ShardWriter, build_manifest, version_id
from helox.data.sources import SourceConfig, read_documents, source_files
from helox.data.synthetic import SyntheticDocument, measure_signal
from helox.data.tokenizer import eos_id, load_tokenizer, train_bpe
from helox.errors import HeloxError
from helox.fileio import fsync_path, sha256_file, sha256_json

ENCODE_BATCH_DOCUMENTS = 512
SPLITS = ("train", "val")

Progress = Callable[[str, int], None]
"""Called with (stage, documents done so far); lets the CLI draw a progress bar."""


class PrepareConfig(Protocol):
    """What preparing a dataset reads of a run's config (a `helox.config.RunConfig` is one):
    the data package sits below the composition of configs and never imports it."""

    workspace: Path
    principal: str | None
    data: DataConfig
    tokenizer: TokenizerConfig


@dataclass(frozen=True)
class Selection:
    """The sources a build may use, and the ones provenance rules excluded (with why)."""

    sources: dict[str, list[SourceConfig]]
    excluded: list[dict]
    file_sha256: dict[Path, str]
    """sha256 of every input file (sources, tokenizer, eval sets): hashed once per build."""


def datasets_dir(config: PrepareConfig) -> Path:
    return versions.datasets_root(config.workspace)


def prepare_dataset(config: PrepareConfig, progress: Progress | None = None,
                    purpose: str = "prepare") -> DatasetVersion:
    """Build (or find the cached, or the pinned) dataset version for the recipe.

    The principal must be allowed to write the dataset's name to build it and to read it to
    get it back; both are recorded in the audit log (`purpose` says what the read is for).
    """
    root, principal = datasets_dir(config), access.resolve_principal(config.principal)
    gov = access.governance_dir(config.workspace)
    if config.data.version is not None:
        dataset = versions.open_usable(root, config.data.version)
    else:
        dataset = _cached_or_built(config, root, gov, principal, progress)
    _authorize_read(gov, dataset, principal, purpose)
    return dataset


def open_named(config: PrepareConfig, reference: str, purpose: str = "train") -> DatasetVersion:
    """An existing dataset of the workspace by name (its head version) or version id/prefix,
    if the principal may read it (recorded in the audit log)."""
    root, principal = datasets_dir(config), access.resolve_principal(config.principal)
    dataset = versions.open_usable(root, versions.head(root, reference) or reference)
    _authorize_read(access.governance_dir(config.workspace), dataset, principal, purpose)
    return dataset


def open_version(config: PrepareConfig, version: str) -> DatasetVersion:
    """A dataset version by id, without an audit record: for the other ranks of a job whose
    rank 0 opened it through `prepare_dataset` or `open_named` (and was recorded)."""
    return versions.open_usable(datasets_dir(config), version)


def _authorize_read(gov: Path, dataset: DatasetVersion, principal: str, purpose: str) -> None:
    if dataset.name not in access.list_acl(gov):
        # Built before access control existed: its first user becomes the owner.
        access.authorize_write(gov, dataset.name, dataset.version, principal)
    access.authorize_read(gov, dataset.name, dataset.version, principal, purpose)


def _cached_or_built(config: PrepareConfig, root: Path, gov: Path, principal: str,
                     progress: Progress | None) -> DatasetVersion:
    selection = select_sources(config)
    inputs_key = _inputs_key(config, selection)
    cached = _cached_version(root, inputs_key)
    if cached is not None:
        return cached
    _check_may_write(gov, config.data.name, principal)
    root.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        dataset = _build(config, selection, tmp_dir, progress or (lambda stage, done: None),
                         lambda version: access.authorize_write(gov, config.data.name, version,
                                                                principal))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    (root / ".by-inputs").mkdir(exist_ok=True)
    (root / ".by-inputs" / inputs_key).write_text(dataset.version)
    return dataset


def _check_may_write(gov: Path, name: str, principal: str) -> None:
    """Refuse before hours of cleaning, not after; the audited write happens at publish time."""
    acl = access.list_acl(gov).get(name)
    if acl is not None and "write" not in acl.permissions_of(principal):
        access.authorize_write(gov, name, None, principal)  # records the denial and raises


def select_sources(config: PrepareConfig) -> Selection:
    today = config.data.as_of or dt.date.today()
    sources: dict[str, list[SourceConfig]] = {}
    excluded = []
    for split in SPLITS:
        sources[split] = []
        for index, source in enumerate(getattr(config.data, split)):
            reason = source.exclusion(config.data.min_trust, today)
            if reason is None:
                sources[split].append(source)
            else:
                excluded.append({"split": split, "path": str(source.path), "reason": reason,
                                 "config_path": f"data.{split}.{index}"})
    if not sources["train"]:
        reasons = "; ".join(f"{e['path']}: {e['reason']}" for e in excluded)
        raise HeloxError(f"every training source is excluded by provenance rules ({reasons})",
                         hint="refresh the sources (retrieved_on), raise their trust, or "
                              "lower data.min_trust")
    files = _input_files(config, sources)
    return Selection(sources, excluded, {f: sha256_file(f) for f in files})


def _build(config: PrepareConfig, selection: Selection, tmp_dir: Path, progress: Progress,
           authorize_write: Callable[[str], None]) -> DatasetVersion:
    statistics, cleaned = {}, {}
    with (tmp_dir / "removed.jsonl").open("w") as removed:
        for split, sources in selection.sources.items():
            if sources:
                cleaned[split] = tmp_dir / f".clean-{split}.jsonl"
                statistics[split] = _clean_split(config, split, sources, cleaned[split],
                                                 removed, progress)
    _require_documents(statistics["train"])
    synthetic = _add_synthetic(config, cleaned, tmp_dir, progress)
    tokenizer = _get_tokenizer(config, cleaned["train"], progress)
    tokenizer.save(str(tmp_dir / "tokenizer.json"))
    synthetic_report = _measure_synthetic(config, synthetic, tokenizer)
    manifest = _write_shards(config, tokenizer, cleaned, tmp_dir, progress)
    for path in cleaned.values():
        path.unlink()
    version = version_id(manifest)
    root = datasets_dir(config)
    report = {"version": version, "splits": statistics, "excluded_sources": selection.excluded,
              "synthetic": synthetic_report}
    _write_json(tmp_dir / "manifest.json", manifest)
    _write_json(tmp_dir / "report.json", report)
    _write_json(tmp_dir / "lineage.json", _lineage(config, selection, statistics, root, version))
    authorize_write(version)
    dataset = _publish(tmp_dir, root, version)
    if versions.head(root, config.data.name) != version:
        versions.set_head(root, config.data.name, version)
    return dataset


def _clean_split(config: PrepareConfig, split: str, sources: list[SourceConfig],
                 out_path: Path, removed, progress: Progress) -> list[dict]:
    """Read and clean one split into `out_path`; return the read + step statistics."""
    read_stats = StepStats("read")
    docs = itertools.chain.from_iterable(read_documents(s, read_stats) for s in sources)
    steps = [s for s in config.data.pipeline
             if split == "train" or not getattr(s, "train_only", False)]
    if config.data.is_chat:
        steps = chat_pipeline(steps)
    stream, step_stats = run_pipeline(docs, steps, config.data.num_workers,
                                      lambda done: progress(f"cleaning {split}", done))
    with out_path.open("w") as out:
        for doc in stream:
            record = {"id": doc.id, "text": doc.text, "domain": doc.domain}
            if CONVERSATION_KEY in doc.metadata:
                record[CONVERSATION_KEY] = doc.metadata[CONVERSATION_KEY]
            out.write(json.dumps(record) + "\n")
    for stats in (read_stats, *step_stats):
        for removal in stats.removals:
            removed.write(json.dumps({"split": split, **dataclasses.asdict(removal)}) + "\n")
    return [stats.summary() for stats in (read_stats, *step_stats)]


def _add_synthetic(config: PrepareConfig, cleaned: dict[str, Path], tmp_dir: Path,
                   progress: Progress) -> dict[str, list[SyntheticDocument]]:
    """Append every synthetic task's documents to the cleaned splits; return the train ones."""
    train_documents = {}
    for task in config.data.synthetic:
        for split in SPLITS:
            documents = task.documents(split)
            if not documents:
                continue
            path = cleaned.setdefault(split, tmp_dir / f".clean-{split}.jsonl")
            with path.open("a") as out:
                for index, doc in enumerate(documents):
                    out.write(json.dumps({"id": f"{task.domain_name}/{split}/{index}",
                                          "text": doc.text, "domain": task.domain_name}) + "\n")
            progress(f"generating {task.domain_name}", len(documents))
            if split == "train":
                train_documents[task.domain_name] = documents
    return train_documents


def _measure_synthetic(config: PrepareConfig,
                       documents: dict[str, list[SyntheticDocument]],
                       tokenizer: Tokenizer) -> list[dict]:
    """Where each task's predictable signal lies, measured with the dataset's own tokenizer."""
    report = []
    for task in config.data.synthetic:
        entry = {"task": task.task, "domain": task.domain_name,
                 "train_documents": task.train_documents, "val_documents": task.val_documents}
        if task.domain_name in documents:
            signal = measure_signal(documents[task.domain_name], tokenizer,
                                    task.local_window_tokens)
            entry["signal"] = dataclasses.asdict(signal)
        report.append(entry)
    return report


def _require_documents(train_statistics: list[dict]) -> None:
    if train_statistics[-1]["docs_out"] > 0:
        return
    table = "; ".join(f"{s['step']}: {s['docs_in']} in, {s['docs_out']} kept" +
                      (f" (dropped {s['dropped']})" if s["dropped"] else "")
                      for s in train_statistics)
    raise HeloxError(f"no training document is left after reading and cleaning ({table})",
                     hint="check the source paths and formats, or loosen the pipeline's "
                          "thresholds for the step that removed everything")


def _cleaned_documents(path: Path) -> Iterator[dict]:
    with path.open() as f:
        for line in f:
            yield json.loads(line)


def _get_tokenizer(config: PrepareConfig, train_path: Path, progress: Progress) -> Tokenizer:
    if config.tokenizer.path is not None:
        return load_tokenizer(config.tokenizer.path)
    docs = reporting(_cleaned_documents(train_path), lambda done: progress("training BPE", done))
    texts = (d["text"] for d in docs)
    return train_bpe(texts, config.tokenizer.vocab_size, config.tokenizer.min_frequency,
                     config.tokenizer.eos_token)


def _write_shards(config: PrepareConfig, tokenizer: Tokenizer, cleaned: dict[str, Path],
                  tmp_dir: Path, progress: Progress) -> dict:
    eos = eos_id(tokenizer, config.tokenizer.eos_token, config.tokenizer.path or "trained BPE")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    chat = config.data.chat if config.data.is_chat else None
    splits, writers, chat_info = {}, {}, None
    if chat is not None:
        template = resolve_template(chat, config.tokenizer.path, config.tokenizer.eos_token)
        template.save(tmp_dir / TEMPLATE_FILE)
        encoder = ChatEncoder(template, tokenizer, chat.train_on, eos, config.tokenizer.eos_token)
        chat_info = {"kind": config.data.chat_kind, "template": template.name,
                     "template_file": TEMPLATE_FILE,
                     "template_sha256": sha256_file(tmp_dir / TEMPLATE_FILE),
                     "train_on": chat.train_on, "row_tokens": chat.row_tokens, "splits": {}}
    for split, path in cleaned.items():
        writer = ShardWriter(tmp_dir, split, vocab_size, config.data.shard_size_tokens,
                             masked=chat is not None, tail_token=eos if chat else None)
        if chat is None:
            _add_documents(writer, tokenizer, path, eos, split, progress)
        else:
            chat_info["splits"][split] = _add_conversations(
                writer, encoder, path, chat.row_tokens, split, progress,
                pairs=config.data.chat_kind == "preference")
        writer.flush()
        splits[split], writers[split] = writer.summary(), writer
    tokenizer_info = {"sha256": sha256_file(tmp_dir / "tokenizer.json"), "vocab_size": vocab_size,
                      "eos_token": config.tokenizer.eos_token, "eos_id": eos}
    return build_manifest(tokenizer_info, writers["train"].dtype, splits,
                          writers["train"].token_counts, chat_info)


def _add_documents(writer: ShardWriter, tokenizer: Tokenizer, path: Path, eos: int, split: str,
                   progress: Progress) -> None:
    for done, batch in enumerate(batched(_cleaned_documents(path), ENCODE_BATCH_DOCUMENTS)):
        for doc, encoding in zip(batch, tokenizer.encode_batch(
                [d["text"] for d in batch], add_special_tokens=False)):
            writer.add(encoding.ids + [eos], doc["domain"])
        progress(f"tokenizing {split}", (done + 1) * ENCODE_BATCH_DOCUMENTS)


def _add_conversations(writer: ShardWriter, encoder: ChatEncoder, path: Path, row_tokens: int,
                       split: str, progress: Progress, pairs: bool = False) -> dict:
    """Render, mask and pack the conversations of each domain into rows, or with `pairs`
    each preference pair into a row of its own (data/chat.py)."""
    by_domain: dict[str, list[dict]] = {}
    for doc in _cleaned_documents(path):
        by_domain.setdefault(doc["domain"], []).append(doc)
    report = {}
    for domain, docs in sorted(by_domain.items()):
        stats = PackStats()
        encode, pack = (encoder.encode_pair, pack_pairs) if pairs else \
            (encoder.encode, pack_conversations)
        encoded = ((doc["id"], *encode(doc)) for doc in reporting(
            docs, lambda done: progress(f"rendering {split}", done)))
        for ids, trained, count in pack(encoded, row_tokens, encoder.eos_id, stats):
            writer.add(ids, domain, trained, documents=count)
        report[domain] = stats.summary()
    return report


def _publish(tmp_dir: Path, root: Path, version: str) -> DatasetVersion:
    """Move the finished folder to its content address; an identical version may exist."""
    final_dir = root / version
    for path in tmp_dir.iterdir():
        fsync_path(path)
    versions.retire_quarantined(root, version)
    if final_dir.exists():
        return DatasetVersion(final_dir)
    os.rename(tmp_dir, final_dir)
    fsync_path(root)
    return DatasetVersion(final_dir)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def _input_files(config: PrepareConfig, sources: dict[str, list[SourceConfig]]) -> list[Path]:
    """Every file whose bytes decide the dataset: sources, tokenizer, eval sets of steps."""
    files = [f for split in SPLITS for s in sources[split] for f in source_files(s)]
    if config.tokenizer.path is not None:
        files.append(config.tokenizer.path)
        beside = config.tokenizer.path.parent / TEMPLATE_FILE
        if config.data.is_chat and beside.is_file():
            files.append(beside)
    chat = config.data.chat
    if config.data.is_chat and chat is not None and chat.template.endswith(".json"):
        files.append(Path(chat.template))
    for step in config.data.pipeline:
        files.extend(f for p in _paths_in(step.model_dump()) for f in _files_of(p))
    return files


def _paths_in(value: Any) -> Iterator[Path]:
    if isinstance(value, Path):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths_in(item)


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _data_code_sha256() -> str:
    """A change to the data code (a filter fixed, say), or to the chat rendering and masking
    that chat datasets go through, must not reuse an old cached build."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in [*sorted(package.glob("*.py")), *sorted((package.parent / "chat").glob("*.py"))]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _inputs_key(config: PrepareConfig, selection: Selection) -> str:
    # Worker count and the judging date do not change the output; the selection they lead to
    # (which sources survived) is part of the key instead.
    data = config.data.model_dump(mode="json", exclude={"num_workers", "as_of"})
    return sha256_json({"data": data, "tokenizer": config.tokenizer.model_dump(mode="json"),
                        "selected": {k: [str(s.path) for s in v]
                                     for k, v in selection.sources.items()},
                        "files": list(selection.file_sha256.values()),
                        "code": _data_code_sha256()})


def _cached_version(root: Path, inputs_key: str) -> DatasetVersion | None:
    pointer = root / ".by-inputs" / inputs_key
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "manifest.json").is_file() or versions.quarantine_record(path) is not None:
        return None
    return DatasetVersion(path)


def _lineage(config: PrepareConfig, selection: Selection, statistics: dict, root: Path,
             version: str) -> dict:
    def describe(source: SourceConfig) -> dict:
        files = [{"path": str(f), "sha256": selection.file_sha256[f]}
                 for f in source_files(source)]
        return {**source.model_dump(mode="json", include={"path", "format", "domain", "trust",
                                                          "retrieved_on", "ttl_days",
                                                          "expires_on"}), "files": files}

    parent = versions.head(root, config.data.name)
    return {"name": config.data.name,
            "principal": access.resolve_principal(config.principal),
            "parents": [parent] if parent and parent != version else [],
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
            "as_of": (config.data.as_of or dt.date.today()).isoformat(),
            "sources": {split: [describe(s) for s in sources]
                        for split, sources in selection.sources.items()},
            "excluded_sources": selection.excluded,
            "pipeline": [step.model_dump(mode="json") for step in config.data.pipeline],
            "statistics": statistics,
            "data_config": config.data.model_dump(mode="json"),
            "tokenizer_config": config.tokenizer.model_dump(mode="json")}
