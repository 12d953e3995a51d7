"""The datatrove adapter gives what Helox's own runner gives, under datatrove's local and Ray
executors.

datatrove's JsonlReader/JsonlWriter need orjson (datatrove's `io` extra), which Helox's
`datatrove` extra does not pull in; the corpus is therefore fed through ParquetReader/Writer,
which need only pyarrow (a Helox dependency).
"""

import importlib
import itertools
import json
import lzma
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from datatrove.data import Document as DatatroveDocument
from datatrove.data import Media
from datatrove.executor import LocalPipelineExecutor, RayPipelineExecutor
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.writers import ParquetWriter

from helox.data.contamination import ContaminationConfig
from helox.data.datatrove_steps import HeloxStep, helox_pipeline
from helox.data.dedup import ExactDedupConfig
from helox.data.document import Document
from helox.data.domains import DomainTagConfig
from helox.data.filters import QualityConfig
from helox.data.pipeline import run_pipeline
from helox.data.safety import PiiConfig
from helox.errors import HeloxError
from helox.testing.tiny import CORPUS

DOCS_PER_DOMAIN = 8
CODE_RULE = {"domain": "code", "patterns": [r"^def [\w.]+\(", r"\bself\b"]}
SCRIPTURE_RULE = {"domain": "scripture", "patterns": [r"\b(?:LORD|unto|hath)\b"],
                  "min_matches": 3}


def corpus_records() -> list[dict]:
    """Real documents of the three bundled domains, made to exercise every kind of step:
    untagged scripture and code (domain_tag), planted emails (pii), short texts (quality),
    and three scripture chapters whose opening is an eval item (contamination)."""
    by_domain: dict[str, list[dict]] = {"scripture": [], "drama": [], "technical": []}
    with lzma.open(CORPUS / "train.jsonl.xz", "rt", encoding="utf-8") as f:
        for record in map(json.loads, f):
            chosen = by_domain[record["domain"]]
            if len(chosen) < DOCS_PER_DOMAIN:
                chosen.append(record)
            if all(len(v) == DOCS_PER_DOMAIN for v in by_domain.values()):
                break
    records = [r for pair in itertools.zip_longest(*by_domain.values()) for r in pair if r]
    for i, record in enumerate(records):
        if record["domain"] != "drama":
            record["domain"] = None  # left to domain_tag
        if i % 5 == 0:
            record["text"] += f"\nWrite to reader{i}@example.org with corrections."
    records += [{"id": f"short/{i}", "text": f"Too short {i}.", "domain": None,
                 "source": "test"} for i in range(3)]
    return records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(records, input folder of 3 Parquet files, eval set file)."""
    root = tmp_path_factory.mktemp("corpus")
    records = corpus_records()
    (root / "raw").mkdir()
    for part in range(3):
        pq.write_table(pa.Table.from_pylist(records[part::3]), root / "raw" / f"{part}.parquet")
    scripture = [r for r in records if r["id"].startswith("kjv/")][:3]
    eval_file = root / "eval.jsonl"
    eval_file.write_text("".join(json.dumps({"text": " ".join(r["text"].split()[:40])}) + "\n"
                                 for r in scripture))
    return records, root / "raw", eval_file


def step_configs(eval_file) -> list:
    # domain_tag before quality, so that what it tags does not depend on quality's thresholds.
    return [ContaminationConfig(eval_sets=[{"name": "bible_quiz", "path": eval_file}]),
            DomainTagConfig(rules=[CODE_RULE, SCRIPTURE_RULE]),
            PiiConfig(),
            QualityConfig()]


def helox_documents(records: list[dict]) -> list[Document]:
    return [Document(id=r["id"], text=r["text"], domain=r["domain"] or "default",
                     source=r["source"]) for r in records]


def run_local(pipeline, tmp_path, tasks: int, workers: int) -> None:
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers,
                          logging_dir=str(tmp_path / "logs")).run()


def written(folder) -> Counter:
    rows = [row for path in sorted(folder.glob("*.parquet"))
            for row in pq.read_table(path).to_pylist()]
    return Counter((r["id"], r["text"], r["metadata"]["domain"]) for r in rows)


def task_stats(logs) -> dict[str, Counter]:
    """Per step name, its datatrove stats summed over the tasks' stats files."""
    totals: dict[str, Counter] = {}
    for path in sorted((logs / "stats").glob("*.json")):
        for step in json.loads(path.read_text()):
            counts = totals.setdefault(step["name"], Counter())
            for key, value in step["stats"].items():
                counts[key] += value["total"] if isinstance(value, dict) else value
    return totals


def test_two_local_tasks_give_the_in_process_documents_and_counts(corpus, tmp_path):
    records, raw, eval_file = corpus
    configs = step_configs(eval_file)
    stream, expected_stats = run_pipeline(helox_documents(records), configs)
    expected = Counter((d.id, d.text, d.domain) for d in stream)
    steps = helox_pipeline(configs)
    run_local([ParquetReader(str(raw)), *steps, ParquetWriter(str(tmp_path / "out"))],
              tmp_path, tasks=2, workers=2)

    assert written(tmp_path / "out") == expected
    # The corpus exercises every step, so equality above is not vacuous.
    assert expected_stats[0].dropped == {"contaminated_bible_quiz": 3}
    assert set(expected_stats[1].changed) == {"tagged_code", "tagged_scripture"}
    assert expected_stats[2].changed["email"] > 0 and expected_stats[3].dropped
    assert {domain for _, _, domain in expected} - {"default"}
    stats = task_stats(tmp_path / "logs")
    for step, want in zip(steps, expected_stats):
        got = stats[str(step)]
        assert (got["total"], got["forwarded"]) == (want.docs_in, want.docs_out)
        assert got["dropped"] == sum(want.dropped.values())
        assert {k: v for k, v in got.items() if k.startswith("dropped_")} == {
            f"dropped_{reason}": n for reason, n in want.dropped.items()}
        assert {k: v for k, v in got.items() if k.startswith("changed_")} == {
            f"changed_{reason}": n for reason, n in want.changed.items()}


def test_documents_keep_their_metadata_and_media_and_exclusions_are_written(corpus, tmp_path):
    _, _, eval_file = corpus
    eval_text = json.loads(eval_file.read_text().splitlines()[0])["text"]
    media = Media(id="m", type=0, url="https://example.org/a.png")
    docs = [DatatroveDocument(text="def f(x):\n    return x", id="a", media=[media],
                              metadata={"lang": "en"}),
            DatatroveDocument(text="Quoted: " + eval_text, id="b", metadata={"domain": "web"}),
            DatatroveDocument(text="plain words", id="c", metadata={"domain": "web"})]
    contamination = HeloxStep(step_configs(eval_file)[0],
                              exclusion_writer=ParquetWriter(str(tmp_path / "excluded")))
    tagger = HeloxStep(DomainTagConfig(rules=[CODE_RULE]))
    out = list(tagger.run(contamination.run(iter(docs), rank=3, world_size=4), 3, 4))

    assert [(d.id, d.metadata) for d in out] == [("a", {"lang": "en", "domain": "code"}),
                                                 ("c", {"domain": "web"})]
    assert out[0].media == [media]
    (path,) = (tmp_path / "excluded").glob("*.parquet")
    assert path.name.endswith("00003.parquet")  # written under the task's rank
    excluded = pq.read_table(path).to_pylist()
    assert [(r["id"], r["metadata"]["filter_reason"]) for r in excluded] == [
        ("b", "contaminated_bible_quiz")]
    assert contamination.stats["dropped_contaminated_bible_quiz"].total == 1
    assert tagger.stats["changed_tagged_code"].total == 1
    assert tagger.stats.time_stats.total > 0


def test_corpus_step_is_refused_on_several_tasks(corpus, tmp_path):
    _, raw, _ = corpus
    pipeline = [ParquetReader(str(raw)), HeloxStep(ExactDedupConfig()),
                ParquetWriter(str(tmp_path / "out"))]
    with pytest.raises(HeloxError) as raised:
        run_local(pipeline, tmp_path, tasks=2, workers=1)
    message = str(raised.value)
    assert "exact_dedup" in message and "tasks=1" in message
    assert "MinhashDedupSignature" in message and "ExactDedupSignature" in message


def test_corpus_step_runs_on_one_task(corpus, tmp_path):
    records, _, _ = corpus
    (tmp_path / "raw").mkdir()
    copies = records[:4] + [dict(r, id=r["id"] + "/copy") for r in records[:2]]
    pq.write_table(pa.Table.from_pylist(copies), tmp_path / "raw" / "0.parquet")
    run_local([ParquetReader(str(tmp_path / "raw")), HeloxStep(ExactDedupConfig()),
               ParquetWriter(str(tmp_path / "out"))], tmp_path, tasks=1, workers=1)
    stream, stats = run_pipeline(helox_documents(copies), [ExactDedupConfig()])
    assert written(tmp_path / "out") == Counter((d.id, d.text, d.domain) for d in stream)
    assert stats[0].dropped == {"exact_duplicate": 2}


def test_not_a_step_config_is_refused():
    with pytest.raises(HeloxError, match="Helox step config"):
        HeloxStep({"step": "quality"})


def test_missing_datatrove_says_which_extra_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "datatrove" or m.startswith("datatrove.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "datatrove", None)  # makes `import datatrove` fail
    monkeypatch.delitem(sys.modules, "helox.data.datatrove_steps")
    with pytest.raises(ImportError) as raised:
        importlib.import_module("helox.data.datatrove_steps")
    assert isinstance(raised.value, HeloxError)
    assert "pip install 'helox[datatrove]'" in str(raised.value)


@pytest.fixture
def local_ray():
    """A one-node Ray cluster started for the test (2 CPUs, no dashboard) and stopped after
    it. tests/conftest.py puts Ray in its single-machine mode, where every Ray server binds
    127.0.0.1 only."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_two_ray_tasks_on_a_local_cluster_give_the_in_process_documents(corpus, tmp_path,
                                                                         local_ray):
    """datatrove's Ray executor, 2 tasks on the local cluster: the documents Helox's own runner
    gives."""
    records, raw, eval_file = corpus
    configs = step_configs(eval_file)
    stream, _ = run_pipeline(helox_documents(records), configs)
    pipeline = [ParquetReader(str(raw)), *helox_pipeline(configs),
                ParquetWriter(str(tmp_path / "out"))]
    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    RayPipelineExecutor(pipeline, tasks=2, workers=2, cpus_per_task=1, mem_per_cpu_gb=0.5,
                        logging_dir=str(tmp_path / "logs")).run()
    assert written(tmp_path / "out") == Counter((d.id, d.text, d.domain) for d in stream)
    assert len(list((tmp_path / "logs" / "completions").iterdir())) == 2
