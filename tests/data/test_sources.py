import gzip
import json

import pytest

from helox.config import SourceConfig
from helox.data.sources import read_documents
from helox.errors import HeloxError


def test_jsonl_gz_and_txt(tmp_path):
    records = [{"id": "a", "text": "first", "domain": "x"}, {"text": "second"}]
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n\n")
    docs = list(read_documents(SourceConfig(path=path, domain="fallback")))
    assert [(d.id, d.text, d.domain) for d in docs] == [
        ("a", "first", "x"), ("docs.jsonl.gz:2", "second", "fallback")]
    txt = tmp_path / "book.txt"
    txt.write_text("whole file is one document\n")
    [doc] = read_documents(SourceConfig(path=txt, domain="books"))
    assert doc.text == "whole file is one document\n" and doc.domain == "books"


def test_max_documents(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    assert len(list(read_documents(SourceConfig(path=path, max_documents=3)))) == 3


@pytest.mark.parametrize("line, expected", [
    ('{"text": "ok"', "d.jsonl:2: not valid JSON"),
    ('{"body": "no text field"}', "d.jsonl:2: expected a JSON object with a string field 'text'"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(HeloxError, match=expected):
        list(read_documents(SourceConfig(path=path)))
