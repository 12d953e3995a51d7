"""A corpus with every kind of item the data pipeline must catch, and the ground truth.

Base documents are chunks of the bundled corpus. Planted, each in its own documents:
exact duplicates (letter case and whitespace changed), near duplicates (true Jaccard of word 5-grams
in [0.8, 1)), paraphrases, PII of every kind, fake secrets of every kind, and passages copied
from a held-out eval set. Base documents whose text has an '@' or a dotted quad are left out
of the pool, by a check independent of the PII step, so that "clean" means clean.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from helox.data.document import Document
from helox.testing.fakes import PII_KINDS, SECRET_KINDS, fake_pii, fake_secret
from helox.testing.near_dups import chunk_documents, load_documents, planted_corpus

LOOKS_PERSONAL = re.compile(r"@|\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b")
EVAL_PASSAGE_WORDS = 30


@dataclass
class Truth:
    exact: dict[str, str] = field(default_factory=dict)
    """Planted exact duplicate id → id of its original."""
    near: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Planted near duplicate id → (original id, true Jaccard)."""
    paraphrase: dict[str, str] = field(default_factory=dict)
    pii: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Document id → [(kind, value)] planted in it."""
    secrets: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    contaminated: set[str] = field(default_factory=set)
    clean: set[str] = field(default_factory=set)
    """Base documents nothing was planted in (they must come through every step but dedup's)."""


@dataclass
class PlantedData:
    docs: list[Document]
    eval_items: list[str]
    truth: Truth


def build(rng: Random, num_base: int = 300, num_exact: int = 15, num_near: int = 30,
          num_paraphrases: int = 12, per_kind: int = 3, num_contaminated: int = 10,
          keep=lambda doc: True) -> PlantedData:
    """`keep(doc)` can restrict the base pool (e.g. to documents a quality filter accepts)."""
    pool = [d for d in chunk_documents(load_documents(max_documents=1500), min_words=120)
            if not LOOKS_PERSONAL.search(d.text) and keep(d)]
    rng.shuffle(pool)
    eval_docs, base = pool[:num_contaminated], pool[num_contaminated:num_contaminated + num_base]
    if len(base) < num_base:
        raise ValueError(f"only {len(base)} base documents available, {num_base} asked")
    truth = Truth()
    corpus = planted_corpus(base, rng, num_near=num_near, num_paraphrases=num_paraphrases)
    for pair in corpus.pairs:
        if pair.kind == "near":
            truth.near[pair.duplicate_id] = (pair.original_id, pair.jaccard)
        else:
            truth.paraphrase[pair.duplicate_id] = pair.original_id
    used = {p.original_id for p in corpus.pairs}
    free = [d for d in base if d.id not in used]
    replaced: dict[str, Document] = {}
    exact = _exact_copies(free[:num_exact], rng, truth)
    free = free[num_exact:]
    for kinds, make, record, label in ((PII_KINDS, fake_pii, truth.pii, "pii"),
                                       (SECRET_KINDS, fake_secret, truth.secrets, "secret")):
        planted = _with_values(free, rng, kinds, per_kind, make, record, label)
        replaced.update(planted)
        free = free[len(planted):]
    replaced.update(_contaminated(free[:num_contaminated], eval_docs, rng, truth))
    docs = [replaced.get(d.id, d) for d in corpus.docs] + exact
    truth.clean = {d.id for d in base} - used - set(replaced)
    rng.shuffle(docs)
    docs = _originals_first(docs, truth)
    return PlantedData(docs, [d.text for d in eval_docs], truth)


def _exact_copies(originals: list[Document], rng: Random, truth: Truth) -> list[Document]:
    copies = []
    for doc in originals:
        if rng.random() < 0.5:  # other case and spacing: what exact dedup normalises away
            text = doc.text[:1].swapcase() + doc.text[1:].replace(" ", "  ", 3)
        else:
            text = "\n" + doc.text.replace("\n", "\n\n", 2) + "  \n"
        copy = Document(f"{doc.id}~exact", text, doc.domain, doc.source)
        truth.exact[copy.id] = doc.id
        copies.append(copy)
    return copies


def _with_values(hosts: list[Document], rng: Random, kinds: tuple[str, ...], per_kind: int,
                 make, record: dict, label: str) -> dict[str, Document]:
    """Host id → a copy of the host with one planted value (under a new id)."""
    planted = {}
    for i, kind in enumerate(k for k in kinds for _ in range(per_kind)):
        host = hosts[i]
        value = make(rng, kind)
        text = _insert(host.text, f"Contact details: {value} (kept on file).", rng)
        doc = Document(f"{host.id}~{label}-{kind}", text, host.domain, host.source)
        record[doc.id] = [(kind, value)]
        planted[host.id] = doc
    return planted


def _contaminated(hosts: list[Document], eval_docs: list[Document], rng: Random,
                  truth: Truth) -> dict[str, Document]:
    planted = {}
    for host, item in zip(hosts, eval_docs):
        words = item.text.split()
        start = rng.randrange(0, max(1, len(words) - EVAL_PASSAGE_WORDS))
        passage = " ".join(words[start:start + EVAL_PASSAGE_WORDS])
        doc = Document(f"{host.id}~eval", _insert(host.text, passage, rng), host.domain,
                       host.source)
        truth.contaminated.add(doc.id)
        planted[host.id] = doc
    return planted


def _insert(text: str, snippet: str, rng: Random) -> str:
    lines = text.split("\n")
    at = rng.randrange(0, len(lines) + 1)
    return "\n".join(lines[:at] + [snippet] + lines[at:])


def _originals_first(docs: list[Document], truth: Truth) -> list[Document]:
    """Dedup keeps the first occurrence: put every original before its planted copies."""
    copy_of = {**truth.exact, **{k: v[0] for k, v in truth.near.items()}, **truth.paraphrase}
    originals = set(copy_of.values())
    first = [d for d in docs if d.id in originals]
    return first + [d for d in docs if d.id not in originals]


def write_jsonl(docs: list[Document], path: Path) -> Path:
    with path.open("w") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc.id, "text": doc.text, "domain": doc.domain}) + "\n")
    return path


def write_eval_set(items: list[str], path: Path) -> Path:
    with path.open("w") as f:
        for i, text in enumerate(items):
            f.write(json.dumps({"id": f"eval-{i}", "text": text}) + "\n")
    return path
