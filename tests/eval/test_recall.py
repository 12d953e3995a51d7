"""Passkey recall of a model trained on the synthetic passkey task, measured by context length
and needle depth (the recall grid of `helox eval`).

The model is the tiny one (d_model 64, 2 layers) trained from scratch on passkey documents of
10 noise words and one needle (`make_probe`'s format: 10-digit values). Its recall stays at 0
for ~1000 steps and then climbs within a few hundred: the abrupt formation of a copying
(induction) circuit, Olsson et al. 2022. When that happens depends on the seed (~1000 to >1600
steps); with train.seed 7 recall at 10 words is 0 at step 1000, 0.37 at 1200, 0.9 at 1600 and
1.0 at 1800. TRAIN_STEPS stops at 1600, ~65 s on 2 idle cores: a slow test. No smaller or
differently tuned setup learned sooner; bench/passkey_recall.py lists what was tried.

The run is deterministic, but a change to the data order or the initialisation (a dataset
version, the tokenizer, the sampler) moves the end of the plateau. If this test then fails at
step 1600 with recall 0, `bench/passkey_recall.py --seeds 7,1,2` shows where it now lies.
"""

import json
import re
import textwrap

import pytest
from rich.console import Console
from typer.testing import CliRunner

from helox.cli import app
from helox.data.prepare import prepare_dataset
from helox.eval.lm import load_language_model
from helox.eval.runner import run_suite
from helox.eval.suite import load_suite
from helox.testing.tiny import tiny_config
from helox.training.loop import train

TRAIN_WORDS = 10
"""Noise words of a training document (~37 tokens with the needle, the query and the answer)."""
MAX_SEQ_LEN = 128
TRAIN_STEPS = 1600
EARLY_STEP = 200
LENGTHS = (10, 20, 100)
"""The grid's context lengths in words: the training length, twice it, and one whose prompt
(~180 tokens) is longer than MAX_SEQ_LEN, so the harness cuts it from the left."""
DEPTHS = (0.0, 0.5, 1.0)
ITEMS_PER_CELL = 10
PASSKEY_RUN_OVERRIDES = [
    # Passkey documents next to 2 corpus documents (a dataset needs a train source; they are 3%
    # of the tokens). local_window_tokens 1: a needle may be as close to the query as a probe's
    # at depth 1. A constant LR: the circuit forms late, when a cosine would have decayed it.
    f"data.synthetic.0={{task: passkey, train_documents: 4000, val_documents: 8, "
    f"context_words: {TRAIN_WORDS}, num_passkeys: 1, local_window_tokens: 1}}",
    f"model.max_seq_len={MAX_SEQ_LEN}", "model.d_ffn=64",
    f"train.seq_len={MAX_SEQ_LEN}", "train.micro_batch_size=8",
    f"train.max_steps={TRAIN_STEPS}", "train.document_masking=true",
    "train.eval_every_steps=0", "optim.schedule=constant", "optim.warmup_steps=20",
    f"checkpoint.every_steps={EARLY_STEP}", f"checkpoint.keep_last={TRAIN_STEPS // EARLY_STEP}",
]


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("passkey")
    config = tiny_config(workspace, PASSKEY_RUN_OVERRIDES, train_documents=2, val_documents=2)
    run_dir = workspace / "run"
    train(config, run_dir, prepare_dataset(config), console=Console(quiet=True))
    return run_dir


def write_grid_suite(folder, thresholds: str = "{}"):
    (folder / "suite.yaml").write_text(textwrap.dedent(f"""
        name: passkey-grid
        tasks:
          - name: passkey
            type: recall
            task: passkey
            context_words: {list(LENGTHS)}
            depths: {list(DEPTHS)}
            items_per_cell: {ITEMS_PER_CELL}
            seed: 1
            thresholds: {thresholds}
        """))
    return folder / "suite.yaml"


def cell(length: int, depth: float) -> str:
    return f"accuracy.len{length}.depth{depth:g}"


def recall_by_length(rows) -> dict[int, float]:
    scores: dict[int, list[float]] = {}
    for row in rows:
        length = int(re.match(r"len(\d+)\.", row.group).group(1))
        scores.setdefault(length, []).append(row.score)
    return {length: sum(s) / len(s) for length, s in scores.items()}


@pytest.mark.slow
def test_recall_of_a_model_trained_on_passkeys_by_length_and_depth(passkey_run, tmp_path):
    suite = load_suite(write_grid_suite(tmp_path))
    early = run_suite(load_language_model(passkey_run / "checkpoints" /
                                          f"step-{EARLY_STEP:08d}"), suite, None)
    lm = load_language_model(passkey_run)
    trained = run_suite(lm, suite, None)
    assert lm.version.startswith(f"step-{TRAIN_STEPS:08d}-")

    for result in (early, trained):
        metrics = result.tasks[0].metrics
        assert set(metrics) == {"accuracy"} | {cell(n, d) for n in LENGTHS for d in DEPTHS}
        assert all(metrics[cell(n, d)].n == ITEMS_PER_CELL for n in LENGTHS for d in DEPTHS)
        assert metrics["accuracy"].n == len(LENGTHS) * len(DEPTHS) * ITEMS_PER_CELL
    # Before the copying circuit forms no 10-digit needle comes back; after, most do at the
    # training length (measured 0.9; 0.53 at 20 words, where far needles are missed).
    assert early.tasks[0].metrics["accuracy"].value == 0
    recall = recall_by_length(trained.rows)
    assert recall[TRAIN_WORDS] >= 0.5, recall

    # Prompts longer than the model's context are cut from the left and say so; a needle at
    # depth 0 is then outside the window and never recalled.
    for row in trained.rows:
        too_long = row.group.startswith(f"len{LENGTHS[-1]}.")
        assert row.detail["truncated"] == too_long, row.id
        assert (row.detail["context_tokens"] > MAX_SEQ_LEN) == too_long, row.id
    assert trained.tasks[0].metrics[cell(LENGTHS[-1], 0.0)].value == 0


@pytest.mark.slow
def test_helox_eval_writes_the_recall_grid_and_gates_on_a_cell(passkey_run, tmp_path):
    gate = f"accuracy.len{TRAIN_WORDS}.depth0.5"
    suite = write_grid_suite(tmp_path, thresholds=f"{{{gate}: {{min: 0.5}}}}")
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(passkey_run), "--suite", str(suite)])
    assert result.exit_code == 0, result.output
    (folder,) = (passkey_run / "evals" / "passkey-grid").glob(f"step-{TRAIN_STEPS:08d}-*")
    results = json.loads((folder / "results.json").read_text())
    metrics = results["tasks"]["passkey"]["metrics"]
    assert {cell(n, d) for n in LENGTHS for d in DEPTHS} <= set(metrics)
    assert all(metrics[cell(n, d)]["n"] == ITEMS_PER_CELL for n in LENGTHS for d in DEPTHS)
    assert results["passed"] and results["tasks"]["passkey"]["thresholds"][gate]["passed"]
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    assert len(items) == len(LENGTHS) * len(DEPTHS) * ITEMS_PER_CELL
    assert {i["group"] for i in items if i["truncated"]} == {
        f"len{LENGTHS[-1]}.depth{d:g}" for d in DEPTHS}

    early = passkey_run / "checkpoints" / f"step-{EARLY_STEP:08d}"
    failed = runner.invoke(app, ["eval", str(early), "--suite", str(suite)])
    assert failed.exit_code == 1, failed.output
    assert f"threshold failed: passkey.{gate} = 0" in failed.output
