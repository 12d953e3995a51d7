"""Document sources: plain text, JSON Lines and Parquet files (text files may be .gz or .xz).

A source is a file or a folder of files. Reading never stops on bad input: an unreadable,
binary, empty or oversized file, an invalid UTF-8 or malformed JSON line, a row without text are
counted in the `read` statistics with their file:line and skipped; documents read before the
problem are kept.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import lzma
from pathlib import Path
from typing import IO, Iterator, Literal

from pydantic import Field, field_validator

from helox.configbase import StrictModel, resolve_input_path
from helox.data.chat import chat_document, parse_chat_record, parse_preference_record
from helox.data.document import Document
from helox.data.pipeline import Removal, StepStats

DEFAULT_DOMAIN = "default"
COMPRESSED_SUFFIXES = (".gz", ".xz")
BINARY_SNIFF_BYTES = 8192


class SourceConfig(StrictModel):
    path: Path
    """A file, or a folder whose files (matching `pattern`) are read in sorted order."""
    pattern: str = "**/*"
    """Glob of the files to read when `path` is a folder."""
    format: Literal["auto", "txt", "jsonl", "parquet", "chat", "preference"] = "auto"
    """File format; `auto` decides from each file name (.jsonl/.ndjson, .parquet, else text).
    `chat`: JSONL conversations or prompt/completion records; `preference`: JSONL preference
    pairs for DPO (see data/chat.py). A dataset's sources are all of one of these kinds, or
    all text."""
    txt_split: Literal["file", "blank_lines"] = "file"
    """Text files: one document per file, or one per block separated by blank lines."""
    domain: str | None = None
    """Domain for documents that carry none (always used for text files)."""
    text_field: str = "text"
    """JSONL key or Parquet column that holds the document text."""
    max_documents: int | None = Field(default=None, gt=0)
    """Read at most this many documents from this source (for smoke runs); None reads all."""
    max_document_bytes: int = Field(default=16_000_000, gt=0)
    """Skip (and count) a document or JSONL line longer than this many bytes."""
    trust: float = Field(default=1.0, ge=0, le=1)
    """How far this source is trusted (0–1); below `data.min_trust` it is excluded."""
    retrieved_on: dt.date | None = None
    """When this copy of the source was fetched; with `ttl_days` it defines the expiry."""
    ttl_days: int | None = Field(default=None, gt=0)
    """Days after `retrieved_on` that the copy may be used; None never expires."""
    expires_on: dt.date | None = None
    """Explicit expiry date (e.g. a licence end); the source is excluded from this day on."""

    _check_path = field_validator("path")(resolve_input_path)

    def expiry(self) -> dt.date | None:
        dates = [self.expires_on] if self.expires_on else []
        if self.ttl_days is not None and self.retrieved_on is not None:
            dates.append(self.retrieved_on + dt.timedelta(days=self.ttl_days))
        return min(dates) if dates else None

    def exclusion(self, min_trust: float, today: dt.date) -> str | None:
        """Why this source must not be used on `today`, or None when it may."""
        if self.ttl_days is not None and self.retrieved_on is None:
            return "ttl_days is set but retrieved_on is not, so its age is unknown"
        expiry = self.expiry()
        if expiry is not None and today >= expiry:
            return f"expired on {expiry.isoformat()} (as of {today.isoformat()})"
        if self.trust < min_trust:
            return f"trust {self.trust} is below data.min_trust {min_trust}"
        return None


def source_files(source: SourceConfig) -> list[Path]:
    if source.path.is_dir():
        return sorted(p for p in source.path.glob(source.pattern) if p.is_file())
    return [source.path]


def file_format(source: SourceConfig, path: Path) -> str:
    if source.format != "auto":
        return source.format
    suffixes = [s for s in path.suffixes if s not in COMPRESSED_SUFFIXES]
    last = suffixes[-1] if suffixes else ""
    if last in (".jsonl", ".ndjson"):
        return "jsonl"
    return "parquet" if last == ".parquet" else "txt"


def read_documents(source: SourceConfig, stats: StepStats | None = None) -> Iterator[Document]:
    """Yield the documents of one source; problems go to `stats` (the `read` step's counts)."""
    stats = stats if stats is not None else StepStats("read")
    count = 0
    for path in source_files(source):
        reader = _READERS[file_format(source, path)]
        for doc in _guarded(reader(source, path, stats), path, stats):
            if source.max_documents is not None and count >= source.max_documents:
                stats.docs_in -= 1  # read but not used: not part of this build's input
                return
            count += 1
            stats.docs_out += 1
            yield doc


def _guarded(docs: Iterator[Document], path: Path, stats: StepStats) -> Iterator[Document]:
    """A file that fails mid-way (truncated archive, bad Parquet) keeps what was read before."""
    try:
        yield from docs
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        _problem(stats, str(path), path, "unreadable_file", f"{type(exc).__name__}: {exc}")


def _problem(stats: StepStats, where: str, path: Path, reason: str, detail: str = "") -> None:
    stats.docs_in += 1
    stats.dropped[reason] += 1
    stats.removals.append(Removal(where, str(path), "read", reason, detail))


def open_binary(path: Path) -> IO[bytes]:
    """Open a possibly compressed file, chosen by its suffix (.gz, .xz)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".xz":
        return lzma.open(path, "rb")
    return path.open("rb")


def _looks_binary(head: bytes) -> bool:
    return b"\x00" in head


def _read_txt(source: SourceConfig, path: Path, stats: StepStats) -> Iterator[Document]:
    if source.txt_split == "blank_lines":
        yield from _read_txt_blocks(source, path, stats)
        return
    with open_binary(path) as f:
        data = f.read(source.max_document_bytes + 1)
    if not data:
        return _problem(stats, str(path), path, "empty_file")
    if _looks_binary(data[:BINARY_SNIFF_BYTES]):
        return _problem(stats, str(path), path, "binary_file")
    if len(data) > source.max_document_bytes:
        return _problem(stats, str(path), path, "too_large",
                        f"more than {source.max_document_bytes} bytes")
    text = _decode(data, stats, str(path), path)
    if text is not None:
        stats.docs_in += 1
        yield Document(id=_doc_name(source, path), text=text,
                       domain=source.domain or DEFAULT_DOMAIN, source=str(path))


def _read_txt_blocks(source: SourceConfig, path: Path, stats: StepStats) -> Iterator[Document]:
    """One document per block of non-blank lines, streamed (a book may be large)."""
    name, domain = _doc_name(source, path), source.domain or DEFAULT_DOMAIN
    with open_binary(path) as f:
        block: list[bytes] = []
        first_line = size = line_no = 0
        for line_no, raw in enumerate(_lines(f, source.max_document_bytes), start=1):
            if line_no == 1 and raw is not None and _looks_binary(raw[:BINARY_SNIFF_BYTES]):
                return _problem(stats, str(path), path, "binary_file")
            if raw is not None and raw.strip():
                first_line = first_line or line_no
                block.append(raw)
                size += len(raw)
                continue
            if raw is None:
                first_line = first_line or line_no
            if block or raw is None:
                yield from _block_document(block, size, source, path, first_line, name,
                                           domain, stats, oversized=raw is None)
            block, first_line, size = [], 0, 0
        if block:
            yield from _block_document(block, size, source, path, first_line, name, domain,
                                       stats, oversized=False)
    if line_no == 0:
        _problem(stats, str(path), path, "empty_file")


def _block_document(block: list[bytes], size: int, source: SourceConfig, path: Path,
                    first_line: int, name: str, domain: str, stats: StepStats,
                    oversized: bool) -> Iterator[Document]:
    where = f"{path}:{first_line}"
    if oversized or size > source.max_document_bytes:
        return _problem(stats, where, path, "too_large",
                        f"block longer than {source.max_document_bytes} bytes")
    text = _decode(b"".join(block), stats, where, path)
    if text is not None:
        stats.docs_in += 1
        yield Document(id=f"{name}:{first_line}", text=text.strip("\n"), domain=domain,
                       source=str(path))


def _doc_name(source: SourceConfig, path: Path) -> str:
    if source.path.is_dir():
        return str(path.relative_to(source.path))
    return path.name


def _decode(data: bytes, stats: StepStats, where: str, path: Path) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        _problem(stats, where, path, "invalid_utf8", f"byte {exc.start}: {exc.reason}")
        return None


def _jsonl_lines(source: SourceConfig, path: Path, stats: StepStats,
                 ) -> Iterator[tuple[str, str]]:
    """(where, text) of every non-blank line of a JSONL file; an over-long line, invalid
    UTF-8, a binary or an empty file are counted in `stats` instead."""
    with open_binary(path) as f:
        empty = True
        for line_no, raw in enumerate(_lines(f, source.max_document_bytes), start=1):
            empty = False
            where = f"{path}:{line_no}"
            if raw is None:
                _problem(stats, where, path, "too_large",
                         f"line longer than {source.max_document_bytes} bytes")
                continue
            if not raw.strip():
                continue
            if line_no == 1 and _looks_binary(raw[:BINARY_SNIFF_BYTES]):
                return _problem(stats, str(path), path, "binary_file")
            line = _decode(raw, stats, where, path)
            if line is not None:
                yield where, line
    if empty:
        _problem(stats, str(path), path, "empty_file")


def _read_jsonl(source: SourceConfig, path: Path, stats: StepStats) -> Iterator[Document]:
    for where, line in _jsonl_lines(source, path, stats):
        record = _parse_record(line, source, where, path, stats)
        if record is not None:
            stats.docs_in += 1
            yield _record_document(record, source, path, f"{path.name}:{_line_of(where)}")


def _read_chat(source: SourceConfig, path: Path, stats: StepStats) -> Iterator[Document]:
    """Conversations (or prompt/completion pairs, or with `format: preference` preference
    pairs), one per line; a document's id is `file:line`."""
    parse = parse_preference_record if source.format == "preference" else parse_chat_record
    for where, line in _jsonl_lines(source, path, stats):
        try:
            conversation = parse(json.loads(line))
        except json.JSONDecodeError as exc:
            _problem(stats, where, path, "malformed_json", f"{exc.msg} at column {exc.colno}")
            continue
        except ValueError as exc:
            _problem(stats, where, path, "not_a_conversation", str(exc))
            continue
        stats.docs_in += 1
        yield chat_document(conversation, f"{path.name}:{_line_of(where)}",
                            source.domain or DEFAULT_DOMAIN, str(path))


def _line_of(where: str) -> str:
    return where.rpartition(":")[2]


def _lines(f: IO[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """Lines of a binary file; an over-long line is consumed in chunks and yielded as None."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
            yield None
            continue
        yield line


def _parse_record(line: str, source: SourceConfig, where: str, path: Path,
                  stats: StepStats) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        _problem(stats, where, path, "malformed_json", f"{exc.msg} at column {exc.colno}")
        return None
    if not isinstance(record, dict) or not isinstance(record.get(source.text_field), str):
        _problem(stats, where, path, "missing_text_field",
                 f"expected a JSON object with a string field '{source.text_field}'")
        return None
    return record


def _record_document(record: dict, source: SourceConfig, path: Path, fallback_id: str
                     ) -> Document:
    metadata = record.get("metadata")
    return Document(
        id=str(record.get("id") or fallback_id),
        text=record[source.text_field],
        domain=str(record.get("domain") or source.domain or DEFAULT_DOMAIN),
        source=str(record.get("source") or path),
        metadata=metadata if isinstance(metadata, dict) else {},
    )


def _read_parquet(source: SourceConfig, path: Path, stats: StepStats) -> Iterator[Document]:
    import pyarrow.parquet as pq  # imported here: only Parquet sources pay for it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, … for a broken file
        return _problem(stats, str(path), path, "unreadable_file", f"{type(exc).__name__}: {exc}")
    names = set(parquet.schema_arrow.names)
    if source.text_field not in names:
        return _problem(stats, str(path), path, "missing_text_field",
                        f"no column '{source.text_field}' (columns: {', '.join(sorted(names))})")
    columns = [c for c in (source.text_field, "id", "domain", "source", "metadata") if c in names]
    row = 0
    for batch in _parquet_batches(parquet, columns, path, stats):
        for record in batch.to_pylist():
            row += 1
            text = record.get(source.text_field)
            if not isinstance(text, str):
                _problem(stats, f"{path}:row {row}", path, "missing_text_field", "null or not text")
            elif len(text) > source.max_document_bytes:
                _problem(stats, f"{path}:row {row}", path, "too_large")
            else:
                stats.docs_in += 1
                yield _record_document(record, source, path, f"{path.name}:{row}")


def _parquet_batches(parquet, columns: list[str], path: Path, stats: StepStats):
    try:
        yield from parquet.iter_batches(columns=columns, batch_size=1024)
    except Exception as exc:  # a corrupt row group: keep the rows read before it
        _problem(stats, str(path), path, "unreadable_file", f"{type(exc).__name__}: {exc}")


_READERS = {"txt": _read_txt, "jsonl": _read_jsonl, "parquet": _read_parquet,
            "chat": _read_chat, "preference": _read_chat}
