"""The harness end to end: scorers against a model whose every prediction is known, probes
against their own text, contamination against a real dataset, regression on planted drops,
and `helox eval` on a trained run."""

import json
import math
import re
import textwrap

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from helox.cli import app
from helox.eval.contamination import contaminated_items, training_texts
from helox.eval.lm import LanguageModel
from helox.eval.results import compare, metric_value
from helox.eval.runner import run_suite
from helox.eval.suite import (GoldenItem, GoldenTask, ReasoningTask, RecallTask,
                              RegressionConfig, load_suite)
from helox.eval.tasks import reasoning_probes, recall_probes, score_golden
from helox.testing.tiny import tiny_config
from helox.training.loop import train

V, HIGH = 27, 10.0
LOGP_RIGHT = HIGH - math.log(math.exp(HIGH) + (V - 1) * math.exp(-HIGH))
LOGP_WRONG = -HIGH - math.log(math.exp(HIGH) + (V - 1) * math.exp(-HIGH))


class CharTokenizer:
    def encode(self, text, add_special_tokens=True):  # it has no special tokens
        return type("Encoding", (), {"ids": [ord(c) - 96 for c in text if c.isalpha()]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids if 0 < i < 27)


def successor_forward(tokens_BT, position_ids_BT, real_BT):
    """A model that always predicts the next letter: logit HIGH there, -HIGH elsewhere."""
    logits_BTV = torch.full((*tokens_BT.shape, V), -HIGH)
    logits_BTV.scatter_(-1, ((tokens_BT + 1) % V)[..., None], HIGH)
    return logits_BTV


def successor_lm() -> LanguageModel:
    return LanguageModel(successor_forward, CharTokenizer(), 0, 64, V, "succ", "test",
                         torch.device("cpu"), batch_size=3)


def golden(scorer, **kwargs):
    return GoldenTask(name="t", type="golden", items="x.jsonl", scorer=scorer, **kwargs)


def item(i, **fields):
    return GoldenItem(id=str(i), **fields)


def test_generative_scorers_on_a_model_whose_output_is_known():
    task = golden("exact", max_new_tokens=4, stop=[])
    items = [item(0, prompt="abc", target="defg"), item(1, prompt="abc", target="defx"),
             item(2, prompt="abc", scorer="contains", target="ef"),
             item(3, prompt="wxy", scorer="contains", target="za"),  # z then EOS: stops
             item(4, prompt="abc", scorer="regex", pattern="^d.f"),
             item(5, prompt="abc", scorer="regex", pattern="^D", )]
    rows = score_golden(successor_lm(), task, items, lambda n: None)
    assert [r.detail["output"] for r in rows] == ["defg", "defg", "defg", "z", "defg", "defg"]
    assert [r.score for r in rows] == [1, 0, 1, 0, 1, 0]
    assert score_golden(successor_lm(), golden("regex", max_new_tokens=2, ignore_case=True),
                        [item(0, prompt="abc", pattern="^D")], lambda n: None)[0].score == 1


def test_choice_scores_are_the_summed_log_likelihoods_and_their_normalisations():
    items = [item(0, prompt="abc", choices=["de", "dx", "xyz"], answer=0)]
    row = score_golden(successor_lm(), golden("choice"), items, lambda n: None)[0]
    # After "c": d right, e right | d right, x wrong | x wrong, then y and z right.
    expected = [2 * LOGP_RIGHT, LOGP_RIGHT + LOGP_WRONG, LOGP_WRONG + 2 * LOGP_RIGHT]
    np.testing.assert_allclose(row.detail["choice_logprobs"], expected, atol=1e-5)
    assert row.score == 1 and row.detail["picked"] == 0
    # After "z" the model predicts EOS, so "ab" and "bc" tie (first wrong, second right); at
    # the start of a document it predicts "a", so "ab" is likely anyway and the prompt adds
    # nothing to it, while it adds as much to "bc" as to nothing: `unconditional` picks "bc".
    items = [item(0, prompt="xyz", choices=["ab", "bc"], answer=1)]
    plain = score_golden(successor_lm(), golden("choice"), items, lambda n: None)[0]
    pmi = score_golden(successor_lm(), golden("choice", normalize="unconditional"), items,
                       lambda n: None)[0]
    assert plain.detail["choice_logprobs"][0] == pytest.approx(plain.detail["choice_logprobs"][1])
    assert plain.detail["picked"] == 0  # the tie goes to the first
    assert pmi.detail["picked"] == 1 and pmi.score == 1


def test_the_perplexity_scorer_bounds_the_targets_perplexity():
    items = [item(0, prompt="abc", target="defg"), item(1, prompt="abc", target="zzzz")]
    rows = score_golden(successor_lm(), golden("perplexity", max_ppl=1.5), items, lambda n: None)
    assert rows[0].detail["ppl"] == pytest.approx(math.exp(-LOGP_RIGHT), abs=1e-5)
    assert rows[1].detail["ppl"] == pytest.approx(math.exp(-LOGP_WRONG), rel=1e-4)
    assert [r.score for r in rows] == [1, 0] and rows[0].tokens == 4


def test_perplexity_per_domain_from_a_file(tmp_path):
    docs = [{"text": "abcdef", "domain": "easy"}, {"text": "abc", "domain": "easy"},
            {"text": "azaz", "domain": "hard"}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "suite.yaml").write_text(textwrap.dedent("""
        name: ppl
        tasks:
          - {name: docs, type: perplexity, path: docs.jsonl, thresholds: {ppl.easy: {max: 1.5}}}
        """))
    result = run_suite(successor_lm(), load_suite(tmp_path / "suite.yaml"), None)
    metrics = result.tasks[0].metrics
    # EOS a b c d e f and EOS a b c: every token right (EOS -> a included); EOS a z a z: a
    # right, z wrong (a -> b), a wrong (z -> EOS, as (26 + 1) % 27 = 0), z wrong.
    assert metrics["ppl.easy"].value == pytest.approx(math.exp(-LOGP_RIGHT), abs=1e-5)
    assert metrics["ppl.hard"].value == pytest.approx(
        math.exp(-(LOGP_RIGHT + 3 * LOGP_WRONG) / 4), rel=1e-4)
    total = (9 * LOGP_RIGHT + LOGP_RIGHT + 3 * LOGP_WRONG) / 13
    assert metrics["ppl"].value == pytest.approx(math.exp(-total), rel=1e-4)
    assert result.failures() == [] and not result.contamination["checked"]


def test_recall_probes_plant_the_needle_at_the_asked_depth():
    task = RecallTask(name="r", type="recall", context_words=[40, 160], depths=[0.0, 0.5, 1.0],
                      items_per_cell=2)
    probes = recall_probes(task)
    assert len(probes) == 12 and len({p[0] for p in probes}) == 12
    for probe_id, group, prompt, answer in probes:
        assert re.fullmatch(r" \d+", answer) and group in probe_id
        words, depth = re.fullmatch(r"len(\d+)\.depth([\d.]+)", group).groups()
        needle_at = prompt.index(answer.strip()) / len(prompt)  # where the value sits
        assert abs(needle_at - float(depth)) < 0.2
        assert prompt.rstrip().endswith("?")


def evaluate_chain(prompt: str) -> int:
    """Run the assignments of a reasoning probe with Python's own arithmetic."""
    values: dict[str, int] = {}
    for statement in prompt[:prompt.rindex(".")].split(". "):
        name, expr = statement.split(" = ")
        values[name] = eval(expr, {}, dict(values))  # names, digits, + and - only
    return values[prompt.rsplit(" ", 2)[-2]]


@pytest.mark.parametrize("generator", ["chained_arithmetic", "variable_tracking"])
def test_reasoning_probes_answers_follow_from_their_prompts(generator):
    task = ReasoningTask(name="q", type="reasoning", generator=generator, steps=[1, 3, 6],
                         items_per_step=5)
    probes = reasoning_probes(task)
    assert len(probes) == 15
    for _, group, prompt, answer in probes:
        assert int(answer) == evaluate_chain(prompt)
        steps = int(group.removeprefix("steps"))
        chains = 1 if generator == "chained_arithmetic" else 2  # variable_tracking: a decoy
        assert prompt.count("=") == chains * (steps + 1) + 1  # assignments, then the question


def test_contamination_finds_training_text_and_only_it(tiny_dataset):
    from helox.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_dataset.tokenizer_path)
    document = next(iter(training_texts(tiny_dataset, tokenizer, lambda n: None)))
    words = document.split()
    texts = {"copied": " ".join(words[5:25]),
             "short_copy": " ".join(words[30:35]),  # fewer words than n: compared whole
             "invented": "the quick brown fox jumps over the lazy dog near the riverbank",
             "short_new": "zebra quantum marmalade"}
    found = contaminated_items(texts, tiny_dataset, tokenizer, ngram_words=8,
                               min_overlap_ngrams=1)
    assert set(found) == {"copied", "short_copy"}
    assert len(found["copied"]) == 13 and len(found["short_copy"]) == 1  # 20 - 8 + 1 grams
    assert set(contaminated_items(texts, tiny_dataset, tokenizer, 8, 14)) == set()


def rows_of(scores, task="t"):
    return [{"task": task, "id": str(i), "score": s, "contaminated": False, "group": None}
            for i, s in enumerate(scores)]


def test_regression_is_a_significant_drop_beyond_the_tolerance():
    tolerance = RegressionConfig(max_accuracy_drop=0.05)
    base = rows_of([1] * 90 + [0] * 10)
    (same,) = compare(base, base, tolerance)
    assert not same.regression and same.change.value == 0
    (planted,) = compare(rows_of([1] * 60 + [0] * 40), base, tolerance)
    assert planted.regression and planted.change.high < 0
    (small,) = compare(rows_of([1] * 87 + [0] * 13), base, tolerance)  # -3%: tolerated
    assert not small.regression
    noisy_base = rows_of([1, 0] * 5)
    (noisy,) = compare(rows_of([1, 0, 0, 0] * 2 + [1, 0]), noisy_base, tolerance)
    assert noisy.change.value < -0.05 and not noisy.regression  # within the noise of 10 items


def test_perplexity_regression_is_relative():
    def ppl_rows(nll):
        return [{"task": "p", "id": str(i), "nll": n, "tokens": 10, "contaminated": False,
                 "group": "d"} for i, n in enumerate(nll)]
    base = ppl_rows(np.linspace(20, 30, 40))
    worse = ppl_rows(np.linspace(20, 30, 40) + 1.0)  # +0.1 nats/token: ppl × 1.105
    comparisons = {c.metric: c for c in compare(worse, base, RegressionConfig())}
    assert set(comparisons) == {"ppl", "ppl.d"}
    assert comparisons["ppl"].regression
    assert math.expm1(comparisons["ppl"].change.value) == pytest.approx(math.expm1(0.1))
    assert metric_value("ppl", base) == pytest.approx(math.exp(25 / 10))


QUOTE_ITEM_ID = "copied"


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, workspace, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    config = tiny_config(workspace, ["train.max_steps=16", "checkpoint.every_steps=4",
                                     "checkpoint.keep_last=4", "train.eval_every_steps=0"])
    train(config, run_dir, tiny_dataset, console=Console(quiet=True))
    return run_dir


def write_suite(tmp_path, tiny_dataset):
    from helox.data.tokenizer import load_tokenizer

    document = next(iter(training_texts(tiny_dataset, load_tokenizer(
        tiny_dataset.tokenizer_path), lambda n: None)))
    words = document.split()
    items = [{"id": QUOTE_ITEM_ID, "prompt": " ".join(words[:12]),
              "choices": [" " + " ".join(words[12:16]), " zebra quantum marmalade"],
              "answer": 0}]
    items += [json.loads(line) for line in
              (load_suite("quickstart").path.parent / "domain_choice.jsonl").read_text()
              .splitlines()]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tmp_path / "suite.yaml").write_text(textwrap.dedent("""
        name: mini
        tasks:
          - name: choice
            type: golden
            items: items.jsonl
            scorer: choice
            normalize: unconditional
            thresholds: {accuracy: {min: 0.0}}
          - name: val
            type: perplexity
            source: validation
            max_documents: 8
            max_tokens: 64
            thresholds: {ppl: {max: 100000}}
        regression: {max_ppl_increase: 0.01}
        """))
    return tmp_path / "suite.yaml"


def test_helox_eval_stores_results_flags_contamination_and_regressions(trained_run, tmp_path,
                                                                      tiny_dataset):
    suite = write_suite(tmp_path, tiny_dataset)
    runner = CliRunner()
    first = runner.invoke(app, ["eval", str(trained_run), "--suite", str(suite)])
    assert first.exit_code == 0, first.output
    versions = sorted((trained_run / "evals" / "mini").iterdir())
    assert [v.name[:14] for v in versions] == ["step-00000016-"]
    results = json.loads((versions[0] / "results.json").read_text())
    assert results["passed"] and results["model"]["version"] == versions[0].name
    assert results["contamination"]["contaminated"] == [f"choice/{QUOTE_ITEM_ID}"]
    choice = results["tasks"]["choice"]
    assert choice["contaminated_items"] == [QUOTE_ITEM_ID]
    assert choice["metrics"]["accuracy"]["n"] == 30  # the clean items
    assert choice["metrics"]["accuracy.contaminated"]["n"] == 1
    lo, hi = choice["metrics"]["accuracy"]["ci_low"], choice["metrics"]["accuracy"]["ci_high"]
    assert lo <= choice["metrics"]["accuracy"]["value"] <= hi
    items = [json.loads(line) for line in (versions[0] / "items.jsonl").read_text().splitlines()]
    documents = results["tasks"]["val"]["metrics"]["ppl"]["n"]
    assert documents == 8 * len(tiny_dataset.domains("val"))
    assert len(items) == 31 + documents and sum(i["contaminated"] for i in items) == 1

    again = runner.invoke(app, ["eval", str(trained_run), "--suite", str(suite), "--baseline",
                                "step-00000016"])
    assert again.exit_code == 0, again.output
    assert "REGRESSION" not in again.output

    earlier = trained_run / "checkpoints" / "step-00000004"
    planted = runner.invoke(app, ["eval", str(earlier), "--suite", str(suite), "--baseline",
                                  "step-00000016"])
    assert planted.exit_code == 1, planted.output
    regression = json.loads(next((trained_run / "evals" / "mini").glob(
        "step-00000004-*/regression.json")).read_text())
    flagged = {c["metric"] for c in regression["comparisons"] if c["regression"]}
    assert "ppl" in flagged


def test_a_failed_threshold_exits_1_and_names_it(trained_run, tmp_path):
    (tmp_path / "suite.yaml").write_text(textwrap.dedent("""
        name: strict
        tasks:
          - {name: val, type: perplexity, source: validation, max_documents: 4,
             thresholds: {ppl: {max: 1.5}}}
        """))
    result = CliRunner().invoke(app, ["eval", str(trained_run), "--suite",
                                      str(tmp_path / "suite.yaml")])
    assert result.exit_code == 1
    assert "threshold failed: val.ppl" in result.output and "needs ≤ 1.5" in result.output


def test_a_barely_trained_model_fails_the_quickstart_suite(trained_run):
    """The shipped thresholds gate: a model 4 steps into training fails both (the quickstart
    model passes with 0.967 and 70.5, README)."""
    from helox.eval.lm import load_language_model
    from helox.eval.runner import dataset_of

    lm = load_language_model(trained_run / "checkpoints" / "step-00000004")
    result = run_suite(lm, load_suite("quickstart"), dataset_of(trained_run / "checkpoints" /
                                                                 "step-00000004"))
    failed = result.failures()
    assert len(failed) == 2, failed
    assert failed[0].startswith("domain_choice.accuracy") and failed[1].startswith(
        "domain_perplexity.ppl")


def test_the_suite_runs_in_the_loop_with_the_numbers_helox_eval_gives(tiny_dataset, workspace,
                                                                      tmp_path):
    from helox.eval.lm import load_language_model
    from helox.eval.runner import dataset_of
    from helox.observe.metrics import read_metrics

    run_dir = tmp_path / "run"
    config = tiny_config(workspace, ["train.max_steps=8", "checkpoint.every_steps=4",
                                     "evaluation.suite=quickstart", "evaluation.every_steps=4",
                                     "evaluation.tasks=[domain_perplexity]"])
    train(config, run_dir, tiny_dataset, console=Console(quiet=True))
    lines = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("event") == "eval"]
    assert [m["step"] for m in lines] == [4, 8]
    assert not any(key.startswith("eval.domain_choice") for key in lines[0])  # the subset
    checkpoint = run_dir / "checkpoints" / "step-00000008"
    offline = run_suite(load_language_model(checkpoint), load_suite("quickstart"),
                        dataset_of(checkpoint))
    ppl = next(t for t in offline.tasks if t.name == "domain_perplexity").metrics
    for metric, estimate in ppl.items():
        assert lines[1][f"eval.domain_perplexity.{metric}"] == pytest.approx(estimate.value,
                                                                             rel=1e-5)
    events = read_metrics(run_dir / "events.jsonl")
    assert [e["event"] for e in events] == ["eval_gate_failed"] * 2
    assert events[0]["runbook"] == "eval-gate" and "domain_perplexity.ppl" in events[0]["message"]
