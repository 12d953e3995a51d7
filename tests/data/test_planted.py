"""The whole cleaning pipeline on a corpus with planted items of every kind (helox.testing.planted).

Stated recall, per kind: exact duplicates 1.0, near duplicates (J >= 0.8) >= 0.95, paraphrases
>= 0.9 (semantic dedup at cosine 0.85; the default 0.9 is more conservative: ~75% of paraphrases,
see SemanticDedupConfig.threshold), PII 1.0, secrets 1.0, eval-set passages 1.0; and no clean
document dropped by the PII or secrets steps.
"""

from random import Random

import pytest

from helox.data.contamination import ContaminationConfig
from helox.data.dedup import ExactDedupConfig, NearDedupConfig, SemanticDedupConfig
from helox.data.domains import DomainTagConfig
from helox.data.filters import NormalizeConfig, QualityConfig
from helox.data.pipeline import StepStats, run_pipeline, run_steps
from helox.data.prepare import prepare_dataset
from helox.data.safety import PiiConfig, SecretsConfig
from helox.testing import planted
from helox.testing.tiny import tiny_config

QUALITY = QualityConfig(min_words=20, min_alpha_word_fraction=0.7)
QUALITY_STEP = QUALITY.build()


def passes_quality(doc) -> bool:
    return len(list(run_steps([doc], [QUALITY_STEP], [StepStats("quality")]))) == 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    data = planted.build(Random(3), keep=passes_quality)
    folder = tmp_path_factory.mktemp("planted")
    eval_path = planted.write_eval_set(data.eval_items, folder / "eval.jsonl")
    train_path = planted.write_jsonl(data.docs, folder / "train.jsonl")
    return data, eval_path, train_path


def pipeline(eval_path, semantic=True):
    steps = [NormalizeConfig(), QUALITY, PiiConfig(), SecretsConfig(),
             ContaminationConfig(eval_sets=[{"name": "heldout", "path": eval_path}]),
             ExactDedupConfig(), NearDedupConfig()]
    if semantic:
        steps.append(SemanticDedupConfig(threshold=0.85))
    return steps + [DomainTagConfig(rules=[{"domain": "code", "patterns": [r">>> "]}])]


@pytest.fixture(scope="module")
def cleaned(corpus):
    data, eval_path, _ = corpus
    stream, stats = run_pipeline(data.docs, pipeline(eval_path))
    kept = {doc.id: doc for doc in stream}
    removed = {r.doc_id: r for s in stats for r in s.removals}
    return kept, removed, stats


def caught_by(truth_ids, removed, steps):
    return sum(1 for i in truth_ids if i in removed and removed[i].step in steps) / len(truth_ids)


def test_every_exact_duplicate_is_removed_naming_its_original(corpus, cleaned):
    data, _, _ = corpus
    kept, removed, _ = cleaned
    assert caught_by(data.truth.exact, removed, {"exact_dedup"}) == 1.0
    assert all(removed[c].detail == o for c, o in data.truth.exact.items())
    assert all(original in kept for original in data.truth.exact.values())


def test_near_duplicates_and_paraphrases_at_the_stated_recall(corpus, cleaned):
    data, _, _ = corpus
    _, removed, _ = cleaned
    near = [i for i, (_, j) in data.truth.near.items() if j >= 0.8]
    assert len(near) >= 25
    assert caught_by(near, removed, {"exact_dedup", "near_dedup"}) >= 0.95
    assert caught_by(data.truth.paraphrase, removed, {"semantic_dedup"}) >= 0.9


def test_every_planted_pii_value_and_secret_is_scrubbed(corpus, cleaned):
    data, _, _ = corpus
    kept, removed, stats = cleaned
    output = "\n".join(doc.text for doc in kept.values())
    for planted_values in (data.truth.pii, data.truth.secrets):
        for doc_id, values in planted_values.items():
            for kind, value in values:
                assert value not in output, f"{kind} {value!r} survived"
            assert doc_id in kept or removed[doc_id].step != "pii", doc_id
    by_step = {s.name: s for s in stats}
    reached = [i for i in data.truth.pii if i in kept]
    assert sum(by_step["pii"].changed.values()) >= len(reached) > 0.8 * len(data.truth.pii)


def test_every_eval_passage_is_removed_as_contamination(corpus, cleaned):
    data, _, _ = corpus
    _, removed, _ = cleaned
    assert caught_by(data.truth.contaminated, removed, {"contamination"}) == 1.0


def test_no_clean_document_is_dropped_by_the_pii_or_secrets_steps(corpus):
    data, _, _ = corpus
    clean = [d for d in data.docs if d.id in data.truth.clean]
    assert len(clean) > 100
    stream, stats = run_pipeline(clean, [PiiConfig(policy="drop"), SecretsConfig(policy="drop")])
    assert len(list(stream)) == len(clean), [r.doc_id for s in stats for r in s.removals]


def test_same_dataset_version_with_one_or_two_workers(corpus, tmp_path):
    _, eval_path, train_path = corpus
    steps = [s.model_dump(mode="json") for s in pipeline(eval_path, semantic=False)]
    versions = []
    for workers in (1, 2):
        config = tiny_config(tmp_path / f"w{workers}")
        raw = config.model_dump(mode="json")
        raw["data"].update(train=[{"path": str(train_path)}], pipeline=steps,
                           num_workers=workers)
        dataset = prepare_dataset(type(config).model_validate(raw))
        versions.append((dataset.version, dataset.report["splits"]))
    (one, report_one), (two, report_two) = versions
    assert one == two
    strip = [[{k: v for k, v in s.items() if k != "seconds"} for s in split]
             for split in (report_one["train"], report_two["train"])]
    assert strip[0] == strip[1]
