import datetime as dt
import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helox.data.pipeline import StepStats
from helox.data.sources import SourceConfig, read_documents


def read(source: SourceConfig) -> tuple[list, StepStats]:
    stats = StepStats("read")
    docs = list(read_documents(source, stats))
    return docs, stats


def test_jsonl_gz_and_txt(tmp_path):
    records = [{"id": "a", "text": "first", "domain": "x"}, {"text": "second"}]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs, _ = read(SourceConfig(path=path, domain="fallback"))
    assert [(d.id, d.text, d.domain) for d in docs] == [
        ("a", "first", "x"), ("docs.jsonl.gz:2", "second", "fallback")]
    txt = tmp_path / "book.txt"
    txt.write_text("whole file is one document\n")
    [doc], _ = read(SourceConfig(path=txt, domain="books"))
    assert doc.text == "whole file is one document\n" and doc.domain == "books"


def test_max_documents_keeps_the_counts_balanced(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    docs, stats = read(SourceConfig(path=path, max_documents=3))
    assert len(docs) == 3
    stats.check_balance()


def test_blank_line_blocks_and_folders(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one\nstill one\n\n\n\ntwo\n\nthree")
    (folder / "sub" / "b.txt").write_text("four\n")
    docs, stats = read(SourceConfig(path=folder, txt_split="blank_lines"))
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt:1", "one\nstill one"), ("a.txt:6", "two"), ("a.txt:8", "three"),
        ("sub/b.txt:1", "four")]
    assert stats.docs_out == 4 and not stats.dropped


def test_parquet_rows_become_documents(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"id": ["p1", "p2", "p3"], "content": ["alpha", None, "gamma"],
                      "domain": ["web", "web", None]})
    pq.write_table(table, path)
    docs, stats = read(SourceConfig(path=path, text_field="content", domain="misc"))
    assert [(d.id, d.text, d.domain) for d in docs] == [("p1", "alpha", "web"),
                                                        ("p3", "gamma", "misc")]
    assert stats.dropped == {"missing_text_field": 1}
    assert stats.removals[0].doc_id.endswith("d.parquet:row 2")


def test_bad_inputs_are_counted_with_file_and_line_never_raised(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "no closing brace"\n'
        b'{"body": "no text field"}\n'
        b'{"text": "bad \xff\xfe utf8"}\n'
        + b'{"text": "' + b"x" * 3_000_000 + b'"}\n'
        b'{"text": "good two"}\n')
    (folder / "b.bin").write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    (folder / "c.txt").write_bytes(b"")
    (folder / "d.txt").write_bytes(b"caf\xe9 latin-1 text")
    (folder / "e.parquet").write_bytes(b"PAR1 this is not parquet")
    with lzma.open(folder / "f.jsonl.xz", "wb") as f:
        f.write(b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(2000)))
    truncated = (folder / "f.jsonl.xz").read_bytes()
    (folder / "f.jsonl.xz").write_bytes(truncated[: len(truncated) // 2])
    docs, stats = read(SourceConfig(path=folder, max_document_bytes=1_000_000))
    texts = [d.text for d in docs]
    assert texts[:2] == ["good one", "good two"]
    assert len(texts) > 2 and all(t.startswith("row ") for t in texts[2:])  # xz before the cut
    assert stats.dropped == {"malformed_json": 1, "missing_text_field": 1, "invalid_utf8": 2,
                             "too_large": 1, "binary_file": 1, "empty_file": 1,
                             "unreadable_file": 2}
    where = {r.reason: r.doc_id for r in stats.removals}
    assert where["malformed_json"].endswith("a.jsonl:2")
    assert where["too_large"].endswith("a.jsonl:5")
    stats.check_balance()


def test_fifty_megabyte_single_line_is_skipped_without_loading_it(tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("wb") as f:
        for _ in range(50):
            f.write(b"y" * (1 << 20))
    docs, stats = read(SourceConfig(path=path, max_document_bytes=16_000_000))
    assert docs == [] and stats.dropped == {"too_large": 1}
    docs, stats = read(SourceConfig(path=path, txt_split="blank_lines",
                                    max_document_bytes=16_000_000))
    assert docs == [] and stats.dropped == {"too_large": 1}


@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"trust": 0.2}, "trust 0.2 is below data.min_trust 0.5"),
    ({"retrieved_on": "2026-01-01", "ttl_days": 30}, "expired on 2026-01-31"),
    ({"retrieved_on": "2026-06-01", "ttl_days": 365}, None),
    ({"expires_on": "2026-06-30"}, "expired on 2026-06-30"),
    ({"ttl_days": 30}, "retrieved_on is not"),
])
def test_provenance_exclusion(tmp_path, fields, expected):
    path = tmp_path / "d.txt"
    path.write_text("x")
    reason = SourceConfig(path=path, **fields).exclusion(min_trust=0.5, today=dt.date(2026, 7, 1))
    assert reason == expected or (expected and expected in reason)
