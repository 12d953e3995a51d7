"""Document sources: plain text and JSON Lines files, optionally gzip or xz compressed."""

from __future__ import annotations

import gzip
import json
import lzma
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from helox.config import SourceConfig
from helox.errors import HeloxError

DEFAULT_DOMAIN = "default"


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    domain: str
    source: str
    metadata: dict = field(default_factory=dict)


def open_text(path: Path) -> IO[str]:
    """Open a possibly compressed UTF-8 text file, chosen by its suffix (.gz, .xz)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def source_format(source: SourceConfig) -> str:
    if source.format != "auto":
        return source.format
    stem_suffixes = [s for s in source.path.suffixes if s not in (".gz", ".xz")]
    if stem_suffixes and stem_suffixes[-1] in (".jsonl", ".ndjson"):
        return "jsonl"
    return "txt"


def read_documents(source: SourceConfig) -> Iterator[Document]:
    """Yield the documents of one source, at most `source.max_documents` of them."""
    reader = _read_jsonl if source_format(source) == "jsonl" else _read_txt
    for count, doc in enumerate(reader(source)):
        if source.max_documents is not None and count >= source.max_documents:
            return
        yield doc


def _read_txt(source: SourceConfig) -> Iterator[Document]:
    with open_text(source.path) as f:
        text = f.read()
    yield Document(id=source.path.name, text=text, domain=source.domain or DEFAULT_DOMAIN,
                   source=str(source.path))


def _read_jsonl(source: SourceConfig) -> Iterator[Document]:
    with open_text(source.path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = _parse_record(line, source, line_no)
            yield Document(
                id=str(record.get("id", f"{source.path.name}:{line_no}")),
                text=record[source.text_field],
                domain=str(record.get("domain") or source.domain or DEFAULT_DOMAIN),
                source=str(record.get("source", source.path)),
                metadata=record.get("metadata") or {},
            )


def _parse_record(line: str, source: SourceConfig, line_no: int) -> dict:
    where = f"{source.path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HeloxError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})",
                         hint="fix or remove that line") from None
    if not isinstance(record, dict) or not isinstance(record.get(source.text_field), str):
        raise HeloxError(f"{where}: expected a JSON object with a string field "
                         f"'{source.text_field}'",
                         hint="fix the line, or set the source's text_field to the right key")
    return record
