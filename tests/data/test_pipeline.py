import json

import pytest

from helox.data import pipeline
from helox.data.contamination import ContaminationConfig
from helox.data.document import Document
from helox.data.domains import DomainTagConfig
from helox.data.pipeline import StepStats, run_pipeline, run_steps

EVAL_PASSAGE = ("the quick brown fox jumps over the lazy dog while the farmer counts "
                "seven sheep near the old mill by the river")


def docs(n: int, plant_every: int = 0) -> list[Document]:
    out = []
    for i in range(n):
        text = f"document {i} talks about def function_{i}(): return {i} in plain words"
        if plant_every and i % plant_every == 0:
            text += " and then " + EVAL_PASSAGE
        out.append(Document(id=f"d{i}", text=text, domain="default", source="mem"))
    return out


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"text": "Question: " + EVAL_PASSAGE.upper() + "?"}) + "\n")
    return path


def configs(eval_file, policy="drop"):
    return [ContaminationConfig(eval_sets=[{"name": "quiz", "path": eval_file}], policy=policy),
            DomainTagConfig(rules=[{"domain": "code", "patterns": [r"\bdef \w+\("]}])]


def test_contamination_drops_docs_sharing_a_13gram_with_an_eval_set(eval_file):
    stream, stats = run_pipeline(docs(20, plant_every=5), configs(eval_file))
    kept = list(stream)
    assert [d.id for d in kept] == [f"d{i}" for i in range(20) if i % 5]
    assert stats[0].dropped == {"contaminated_quiz": 4}
    assert {r.doc_id for r in stats[0].removals} == {"d0", "d5", "d10", "d15"}
    assert "13-grams" in stats[0].removals[0].detail
    assert all(d.domain == "code" for d in kept) and stats[1].changed == {"tagged_code": 16}


def test_contamination_report_policy_keeps_and_counts(eval_file):
    stream, stats = run_pipeline(docs(10, plant_every=5), configs(eval_file, policy="report"))
    assert len(list(stream)) == 10
    assert stats[0].changed["contaminated_quiz"] == 2 and not stats[0].dropped


def test_twelve_shared_words_are_not_contamination(eval_file):
    short = " ".join(EVAL_PASSAGE.split()[:12])
    doc = Document(id="x", text=short, domain="default", source="mem")
    stream, stats = run_pipeline([doc], configs(eval_file)[:1])
    assert len(list(stream)) == 1


def test_workers_give_the_same_documents_in_the_same_order(eval_file):
    one, stats_one = run_pipeline(docs(1000, plant_every=7), configs(eval_file))
    two, stats_two = run_pipeline(docs(1000, plant_every=7), configs(eval_file), num_workers=2)
    assert list(one) == list(two)
    for a, b in zip(stats_one, stats_two):
        assert (a.docs_in, a.docs_out, a.dropped, a.changed) == \
               (b.docs_in, b.docs_out, b.dropped, b.changed)
        assert [r.doc_id for r in a.removals] == [r.doc_id for r in b.removals]


def test_a_step_that_loses_documents_silently_is_caught():
    class Leaky:
        name, scope = "leaky", "document"

        def run(self, docs, stats):
            for i, doc in enumerate(docs):
                if i % 2 == 0:
                    yield doc

    with pytest.raises(RuntimeError, match="'leaky' took 4 documents but yielded 2"):
        list(run_steps(docs(4), [Leaky()], [StepStats("leaky")]))


class FakeClock:
    """The pipeline's clock in these tests: time moves only when a test says work was done, so
    the step times are exact (quarter seconds add up exactly in floating point)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(pipeline, "clock", clock)
    return clock


def slow_docs(n: int, clock: FakeClock):
    """A source that takes 1 s per document: upstream time no step may be charged for."""
    for doc in docs(n):
        clock.now += 1.0
        yield doc


class Slow:
    """Works 0.25 s per document: a step whose own time is known."""

    name, scope = "slow", "document"

    def __init__(self, clock: FakeClock):
        self.clock = clock

    def run(self, docs, stats):
        for doc in docs:
            self.clock.now += 0.25
            yield doc


class PassThrough:
    def __init__(self, name, scope):
        self.name, self.scope = name, scope

    def run(self, docs, stats):
        yield from list(docs) if self.scope == "corpus" else docs


class Config:
    def __init__(self, step):
        self.step, self.scope, self._step = step.name, step.scope, step

    def build(self):
        return self._step


def test_step_seconds_exclude_upstream_time(fake_clock):
    stats = [StepStats("slow"), StepStats("fast")]
    steps = [Slow(fake_clock), PassThrough("fast", "document")]
    assert len(list(run_steps(slow_docs(10, fake_clock), steps, stats))) == 10
    assert fake_clock.now == 12.5  # 10 s reading, 2.5 s in the slow step
    assert (stats[0].seconds, stats[1].seconds) == (2.5, 0.0)


def test_a_corpus_step_after_a_slow_document_step_is_not_charged_for_it(fake_clock):
    configs = [Config(Slow(fake_clock)), Config(PassThrough("collect", "corpus"))]
    stream, stats = run_pipeline(slow_docs(10, fake_clock), configs)
    assert len(list(stream)) == 10
    assert (stats[0].seconds, stats[1].seconds) == (2.5, 0.0)


def test_workers_with_a_corpus_step_between_document_steps(eval_file):
    """Two document segments share one pool around a corpus step (a feeder-thread design
    deadlocks here)."""
    from helox.data.dedup import ExactDedupConfig

    corpus = docs(600, plant_every=7)
    corpus += [Document(id=f"copy{i}", text=corpus[i].text.upper(), domain="default",
                        source="mem") for i in range(0, 600, 50)]
    contamination, domain_tag = configs(eval_file)
    steps = [contamination, ExactDedupConfig(), domain_tag]
    one, _ = run_pipeline(corpus, steps)
    two, stats = run_pipeline(corpus, steps, num_workers=2)
    assert list(one) == list(two)
    # 12 copies; the 2 of contaminated documents are already gone when exact dedup sees them
    assert stats[1].dropped == {"exact_duplicate": 10}
