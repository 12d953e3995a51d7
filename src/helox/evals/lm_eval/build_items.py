"""Rebuild cloze.jsonl and passages.jsonl from the bundled corpus's validation split.

    python src/helox/evals/lm_eval/build_items.py

Deterministic: documents are taken in the order of sha256(salt + id), so the files only change
when the corpus or this script does. Every text comes from `corpus/val.jsonl.xz`, which the
quickstart recipe never trains on.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path

from helox.resources import corpus_dir

HERE = Path(__file__).resolve().parent
VAL = corpus_dir() / "val.jsonl.xz"
DOMAINS = ("scripture", "drama", "technical")
ITEMS_PER_DOMAIN = 10
PASSAGES_PER_DOMAIN = 2
CONTINUATION_WORDS = 4
PASSAGE_CHARS = 600


def _order(doc_id: str, salt: str) -> bytes:
    return hashlib.sha256(f"helox-lm-eval-{salt}:{doc_id}".encode()).digest()


def _is_prose(line: str, domain: str) -> bool:
    """A line of running text: not a heading, speaker name, stage direction or code."""
    words = line.split()
    if not 9 <= len(words) <= 25 or line != line.strip():
        return False
    if domain == "drama":
        return not line.startswith("[") and not line.isupper()
    if domain == "technical":
        return not line.startswith((">>>", "...", "def ", "class ", "module ")) and "`" not in line
    return True


def _cloze(doc: dict) -> dict | None:
    """The first prose line after the document's first line: the two text lines before it
    (with the blank lines between them, as in the corpus) and its start are the context, its
    last words the answer."""
    lines = doc["text"].split("\n")
    text_rows = [i for i, line in enumerate(lines) if line.strip()]
    for n, i in enumerate(text_rows[1:], start=1):
        if _is_prose(lines[i], doc["domain"]):
            words = lines[i].split()
            before = lines[text_rows[max(0, n - 2)]:i]
            return {"id": doc["id"], "domain": doc["domain"],
                    "context": "\n".join([*before, " ".join(words[:-CONTINUATION_WORDS])]),
                    "answer": " ".join(words[-CONTINUATION_WORDS:])}
    return None


def _passage(doc: dict) -> dict:
    """The document's first lines up to PASSAGE_CHARS, cut at a line end."""
    text = doc["text"][:PASSAGE_CHARS]
    return {"id": doc["id"], "domain": doc["domain"], "text": text[:text.rindex("\n")]}


def build(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Item i of every domain shares its three choices: its own answer and the answers of the
    other domains' item i. Each answer is then right once and wrong twice, so a model's
    unconditional taste for one phrase cancels out and only reading the context helps."""
    by_domain = {d: sorted((doc for doc in docs if doc["domain"] == d),
                           key=lambda doc: _order(doc["id"], "cloze")) for d in DOMAINS}
    clozes = {d: [c for c in map(_cloze, by_domain[d]) if c][:ITEMS_PER_DOMAIN] for d in DOMAINS}
    items = []
    for i in range(ITEMS_PER_DOMAIN):
        answers = [clozes[d][i]["answer"] for d in DOMAINS]
        for k, d in enumerate(DOMAINS):
            shift = (i + k) % len(DOMAINS)  # the right answer's position varies
            choices = answers[shift:] + answers[:shift]
            item = clozes[d][i]
            items.append({**{key: item[key] for key in ("id", "domain", "context")},
                          "choices": choices, "label": choices.index(item["answer"])})
    passages = [_passage(doc) for d in DOMAINS
                for doc in sorted(by_domain[d], key=lambda doc: _order(doc["id"], "passage")
                                  )[:PASSAGES_PER_DOMAIN]]
    return items, passages


def main() -> None:
    with lzma.open(VAL, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    items, passages = build(docs)
    for name, rows in (("cloze.jsonl", items), ("passages.jsonl", passages)):
        (HERE / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                         for row in rows), encoding="utf-8")
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
