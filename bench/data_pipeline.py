"""Data pipeline benchmark: dedup speed and recall on the bundled corpus with planted duplicates.

The documents: the bundled corpus (train + val) cut at line breaks into chunks of at least
`--min-words` words (exact repeats left out), plus planted duplicates of distinct chunks, each
placed after its original: `--num-near` word mutations with true Jaccard in [0.8, 1.0) and
`--num-far` in [0.5, 0.75) (similar but not duplicates: dropping one is a false drop). The true
Jaccard is the reference one of `helox.testing.near_dups` (Python sets of word 5-grams).

What is measured, in one process, the variants interleaved over `--rounds` (median seconds):
- near dedup: Helox's `near_dedup` step (rensa R-MinHash LSH with the bands × rows chosen for
  min_recall, every candidate verified by exact Jaccard) against a plain datasketch MinHashLSH
  (num_perm=128, threshold=0.8, its own (b, r); MinHash.generator, query then insert, a
  non-empty query drops: the usual way). Both start from the same shingle strings
  (`helox.data.dedup.word_shingles`) and the timings include shingling. Recall is over the
  planted pairs with true J >= 0.8; a false drop is one whose best candidate has true J < 0.8.
- per step: docs/s of every step but semantic_dedup, chained as in the quickstart recipe
  through `run_pipeline` (`time_steps`), each step's own time (upstream excluded).
- whole pipeline (the same steps) wall clock with num_workers 1 and 2: the target is
  >= 1,000 docs/s on 2 cores.
- semantic_dedup on the first `--semantic-docs` documents only (MiniLM on this CPU embeds tens
  of documents per second; the comparison against kept documents is a numpy matmul).

Run: .venv/bin/python bench/data_pipeline.py [--min-words 60] [--rounds 3] [--semantic-docs 400]
(about 2 minutes on 2 cores; most of it is datasketch and the embeddings). `--min-words 480
--num-near 500 --num-far 100` gives 5,400 documents of 1.7 KB on average (median 1 KB: the
docstrings are short) to measure throughput at a realistic size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from random import Random

from datasketch import MinHash, MinHashLSH

from helox.data.dedup import (ExactDedupConfig, NearDedupConfig, SemanticDedupConfig,
                              word_shingles)
from helox.data.contamination import ContaminationConfig
from helox.data.document import Document
from helox.data.domains import DomainTagConfig
from helox.data.filters import NormalizeConfig, QualityConfig
from helox.data.pipeline import StepConfig, StepStats, run_pipeline
from helox.data.safety import PiiConfig, SecretsConfig
from helox.testing.near_dups import (PlantedCorpus, chunk_documents, load_documents,
                                     planted_corpus, text_jaccard)
from helox.testing.tiny import CORPUS

DUPLICATE_JACCARD = 0.8
DATASKETCH_NUM_PERM = 128


@dataclass
class NearResult:
    name: str
    seconds: float
    dropped: dict[str, list[str]]
    """Dropped document id -> the kept ids it was matched against (candidates)."""


def build_corpus(args: argparse.Namespace) -> PlantedCorpus:
    docs = load_documents(CORPUS / "train.jsonl.xz") + load_documents(CORPUS / "val.jsonl.xz")
    base = chunk_documents(docs, min_words=args.min_words)
    return planted_corpus(base, Random(args.seed), num_near=args.num_near, num_far=args.num_far)


def step_configs(eval_path: Path) -> list[StepConfig]:
    """Every step but semantic_dedup, in the order of the quickstart recipe, with the
    thresholds used there (semantic_dedup runs on a subset)."""
    return [NormalizeConfig(), QualityConfig(min_words=20, min_alpha_word_fraction=0.7),
            PiiConfig(), SecretsConfig(),
            ContaminationConfig(eval_sets=[{"name": "bench_eval", "path": eval_path}]),
            ExactDedupConfig(), NearDedupConfig(),
            DomainTagConfig(rules=[{"domain": "code", "patterns": [r">>> ", r"\bdef \w+\("]}])]


def write_eval_set(docs: list[Document], folder: Path, rng: Random) -> Path:
    """An eval set of 200 corpus chunks, so that contamination has something to find."""
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in rng.sample(docs, 200)))
    return path


def print_whole_pipeline(configs: list[StepConfig], docs: list[Document], rounds: int) -> None:
    print(f"\n## whole pipeline without semantic_dedup ({len(docs):,} docs, wall clock, "
          f"median of {rounds} rounds)")
    for workers in (1, 2):
        seconds = statistics.median(time_steps(configs, docs, workers)[2] for _ in range(rounds))
        print(f"num_workers={workers}: {seconds:.2f} s, {len(docs) / seconds:,.0f} docs/s")


def time_steps(configs: list[StepConfig], docs: list[Document], num_workers: int = 1
               ) -> tuple[list[Document], list[StepStats], float]:
    """Run `configs` as one pipeline over `docs`: kept documents, per-step stats, wall seconds."""
    start = time.perf_counter()
    stream, stats = run_pipeline(docs, configs, num_workers=num_workers)
    kept = list(stream)
    return kept, stats, time.perf_counter() - start


def helox_near(docs: list[Document]) -> NearResult:
    _, [stats], seconds = time_steps([NearDedupConfig()], docs)
    dropped = {r.doc_id: [r.detail.split(" (")[0]] for r in stats.removals}
    return NearResult("helox near_dedup", seconds, dropped)


def datasketch_near(docs: list[Document]) -> NearResult:
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=DUPLICATE_JACCARD, num_perm=DATASKETCH_NUM_PERM)
    shingles = ([s.encode("utf-8") for s in word_shingles(d.text, 5)] for d in docs)
    dropped = {}
    for doc, minhash in zip(docs, MinHash.generator(shingles, num_perm=DATASKETCH_NUM_PERM)):
        candidates = lsh.query(minhash)
        if candidates:
            dropped[doc.id] = candidates
        else:
            lsh.insert(doc.id, minhash)
    return NearResult(f"datasketch b={lsh.b} r={lsh.r}", time.perf_counter() - start, dropped)


def near_quality(result: NearResult, corpus: PlantedCorpus,
                 by_id: dict[str, Document]) -> dict[str, float]:
    duplicates = [p.duplicate_id for p in corpus.pairs if p.jaccard >= DUPLICATE_JACCARD]
    planted = {p.duplicate_id for p in corpus.pairs}
    false_drops = sum(
        max(text_jaccard(by_id[doc_id].text, by_id[k].text) for k in kept) < DUPLICATE_JACCARD
        for doc_id, kept in result.dropped.items())
    return {"recall": sum(d in result.dropped for d in duplicates) / len(duplicates),
            "false_drops": false_drops,
            "far_dropped": sum(p.duplicate_id in result.dropped for p in corpus.pairs
                               if p.jaccard < DUPLICATE_JACCARD),
            "base_dropped": sum(d not in planted for d in result.dropped)}


def compare_near(corpus: PlantedCorpus, rounds: int) -> None:
    by_id = {d.id: d for d in corpus.docs}
    seconds: dict[str, list[float]] = {}
    last: dict[str, NearResult] = {}
    for _ in range(rounds):
        for variant in (helox_near, datasketch_near):
            result = variant(corpus.docs)
            seconds.setdefault(result.name, []).append(result.seconds)
            last[result.name] = result
    print(f"\n## near dedup ({len(corpus.docs):,} docs, median of {rounds} rounds)")
    print(f"{'variant':<24}{'seconds':>9}{'docs/s':>9}{'recall@0.8':>12}{'false drops':>13}"
          f"{'far dropped':>13}{'base dropped':>14}")
    rows = {}
    for name, result in last.items():
        median = statistics.median(seconds[name])
        quality = near_quality(result, corpus, by_id)
        rows[name] = (median, quality)
        print(f"{name:<24}{median:>9.2f}{len(corpus.docs) / median:>9.0f}"
              f"{quality['recall']:>12.3f}{quality['false_drops']:>13}"
              f"{quality['far_dropped']:>13}{quality['base_dropped']:>14}")
    (helox_s, helox_q), (ds_s, ds_q) = rows.values()
    print(f"helox / datasketch: throughput x{ds_s / helox_s:.1f}, recall "
          f"{helox_q['recall']:.3f} vs {ds_q['recall']:.3f}")


def print_step_table(title: str, configs: list[StepConfig], docs: list[Document],
                     rounds: int) -> None:
    runs = [time_steps(configs, docs) for _ in range(rounds)]
    print(f"\n## {title} ({len(docs):,} docs, median of {rounds} rounds)")
    print(f"{'step':<18}{'docs in':>9}{'docs out':>10}{'seconds':>9}{'docs/s':>9}")
    for i, config in enumerate(configs):
        seconds = statistics.median(stats[i].seconds for _, stats, _ in runs)
        stats = runs[-1][1][i]
        print(f"{stats.name:<18}{stats.docs_in:>9,}{stats.docs_out:>10,}{seconds:>9.2f}"
              f"{stats.docs_in / seconds:>9.0f}")


def describe(corpus: PlantedCorpus) -> None:
    chars = [len(d.text) for d in corpus.docs]
    bands = [(0.5, 0.75), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.0)]
    counts = ", ".join(f"[{lo}, {hi}): {sum(lo <= p.jaccard < hi for p in corpus.pairs)}"
                       for lo, hi in bands)
    print(f"corpus: {len(corpus.docs):,} docs, mean {statistics.mean(chars):,.0f} chars "
          f"(median {statistics.median(chars):,.0f}); planted pairs by true Jaccard: {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-words", type=int, default=60,
                        help="words per corpus chunk (60: ~20k chunks of ~400 chars)")
    parser.add_argument("--num-near", type=int, default=2000)
    parser.add_argument("--num-far", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--semantic-docs", type=int, default=400,
                        help="documents for semantic_dedup (0 skips it)")
    parser.add_argument("--skip-datasketch", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    corpus = build_corpus(args)
    describe(corpus)
    near = NearDedupConfig()
    print("helox near_dedup: threshold %.2f, min_recall %.2f, num_perm %d -> bands x rows %s"
          % (near.threshold, near.min_recall, near.num_perm, near.bands_rows()))
    if not args.skip_datasketch:
        compare_near(corpus, args.rounds)
    with tempfile.TemporaryDirectory() as folder:
        configs = step_configs(write_eval_set(corpus.docs, Path(folder), Random(args.seed)))
        print_step_table("per step (one process; seconds exclude upstream steps)", configs,
                         corpus.docs, args.rounds)
        print_whole_pipeline(configs, corpus.docs, args.rounds)
    if args.semantic_docs:
        subset = corpus.docs[:args.semantic_docs]
        time_steps([SemanticDedupConfig()], subset[:8])  # loads the model outside the timing
        print_step_table("semantic_dedup on a subset (CPU)", [SemanticDedupConfig()], subset, 1)


if __name__ == "__main__":
    main()
