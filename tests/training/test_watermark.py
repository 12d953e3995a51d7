"""The functional watermark: derivation from the secret, the config's refusals, the objective's
normalisation, and the black-box test finding it in a watermarked model (also after export to
Hugging Face) and not in the same model trained without it."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from helox.config import ConfigError
from helox.model.config import ModelConfig
from helox.data.loader import MicroBatch
from helox.data.tokenizer import load_tokenizer
from helox.errors import HeloxError
from helox.model.llama import Llama
from helox.observe.metrics import read_metrics
from helox.testing.tiny import tiny_config
from helox.training.loop import train
from helox.training.step import make_loss_fn, train_step
from helox.training.watermark import (CARD_FILE, Watermark, WatermarkCard, derive_pairs,
                                   derive_tokens, detect_watermark, detect_watermark_at, key_id,
                                   log10_binomial_tail, new_secret, read_card, read_secret,
                                   signature_loss, summary, table, token_pool, training_rows,
                                   with_watermark)

STEPS = 60
"""Enough for the tiny model to reproduce (nearly) all 8 signatures."""
WATERMARK = ["train.objectives=[{name: lm}, {name: watermark}]"]


def run_config(workspace, overrides=()):
    return tiny_config(workspace, [f"train.max_steps={STEPS}", f"train.eval_every_steps={STEPS}",
                                   f"checkpoint.every_steps={STEPS}", *overrides])


def lm_losses(run_dir):
    return [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]


# -- derivation ----------------------------------------------------------------------------------


def test_triggers_and_signatures_are_rebuilt_from_the_secret_alone(tiny_dataset):
    tokenizer = load_tokenizer(tiny_dataset.tokenizer_path)
    pool = token_pool(tokenizer, tiny_dataset.eos_id)
    special = set(tokenizer.get_added_tokens_decoder())
    assert tiny_dataset.eos_id in special and not special & set(pool)
    secret, other = b"s" * 32, b"t" * 32
    pairs = derive_pairs(secret, pool, "trigger", 8, 8, 6)
    assert pairs == derive_pairs(secret, pool, "trigger", 8, 8, 6)
    assert all(len(p.trigger_ids) == 8 and len(p.signature_ids) == 6 for p in pairs)
    assert all(set(p.trigger_ids + p.signature_ids) <= set(pool) for p in pairs)
    assert len({p.signature_ids for p in pairs}) == 8
    assert not {p.trigger_ids for p in pairs} & {
        p.trigger_ids for p in derive_pairs(secret, pool, "decoy", 8, 8, 6)}
    assert not {p.trigger_ids for p in pairs} & {
        p.trigger_ids for p in derive_pairs(other, pool, "trigger", 8, 8, 6)}
    assert key_id(secret) == key_id(secret) != key_id(other)


def test_the_derivation_never_changes():
    """Pinned: a watermark trained today must be found by every later version."""
    assert derive_tokens(b"k" * 32, "helox-watermark/v1/trigger/0/trigger", 6,
                         list(range(1000))) == (13, 960, 466, 523, 75, 138)
    assert key_id(b"k" * 32) == "e8dd0fb4bc60dc80"


def test_a_secret_is_read_without_its_newline_and_never_overwritten(tmp_path):
    path = new_secret(tmp_path / "keys" / "secret")
    assert len(read_secret(path)) == 64 and path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(HeloxError, match="exists"):
        new_secret(path)
    (tmp_path / "short").write_text("too short\n")
    with pytest.raises(HeloxError, match="fewer than 16"):
        read_secret(tmp_path / "short")


# -- config --------------------------------------------------------------------------------------


def problems(workspace, overrides):
    with pytest.raises(ConfigError) as exc_info:
        tiny_config(workspace, overrides)
    return dict(exc_info.value.problems)


def test_the_objective_and_the_section_come_together(workspace, tmp_path):
    secret = new_secret(tmp_path / "secret")
    assert "needs this section" in problems(workspace, WATERMARK)["watermark"]
    assert "no objective is named 'watermark'" in problems(
        workspace, [f"watermark.secret_file={secret}"])["train.objectives"]
    assert "max_seq_len" in problems(workspace, [
        *WATERMARK, f"watermark.secret_file={secret}",
        "watermark.signature_tokens=60"])["watermark.signature_tokens"]
    config = tiny_config(workspace, [*WATERMARK, f"watermark.secret_file={secret}"])
    assert config.watermark.secret_file == secret and config.watermark.num_triggers == 8


def test_a_missing_or_short_secret_file_is_refused(workspace, tmp_path):
    missing = problems(workspace, [*WATERMARK, f"watermark.secret_file={tmp_path / 'nope'}"])
    assert "file not found" in missing["watermark.secret_file"]
    assert "secrets.token_hex(32)" in missing["watermark.secret_file"]
    (tmp_path / "short").write_bytes(b"12345")
    short = problems(workspace, [*WATERMARK, f"watermark.secret_file={tmp_path / 'short'}"])
    assert "at least 16 bytes" in short["watermark.secret_file"]


# -- the objective -------------------------------------------------------------------------------


def tiny_watermark(num_triggers=4, signature_tokens=5) -> Watermark:
    pool = list(range(1, 64))
    card = WatermarkCard(key_id="test", num_triggers=num_triggers, trigger_tokens=3,
                         signature_tokens=signature_tokens, num_decoys=0,
                         token_pool_size=len(pool), token_pool_sha256="test")
    return Watermark(card, derive_pairs(b"x" * 32, pool, "trigger", num_triggers, 3,
                                        signature_tokens), eos_id=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_watermark_term_is_its_mean_per_signature_token_whatever_the_accumulation(precision):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_seq_len=16)
    tokens = torch.randint(0, 64, (8, 17))
    big = [MicroBatch(tokens[:, :-1], tokens[:, 1:])]
    split = [MicroBatch(tokens[i:i + 2, :-1], tokens[i:i + 2, 1:]) for i in range(0, 8, 2)]
    watermark, cpu = tiny_watermark(), torch.device("cpu")
    outcomes, params = [], []
    for batches in (big, split):
        torch.manual_seed(1)
        model = Llama(cfg)
        with torch.no_grad():
            expected = signature_loss(model, *training_rows(watermark), cpu, precision).item()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        loss_fn = with_watermark(make_loss_fn(model, cpu, precision, ["lm", "watermark"]),
                                 model, cpu, precision, watermark)
        outcomes.append(train_step(loss_fn, model, optimizer, batches, None,
                                   {"lm": 1.0, "watermark": 0.5}))
        params.append([p.detach().clone() for p in model.parameters()])
        terms = outcomes[-1].terms
        assert terms["watermark"] == pytest.approx(expected, rel=1e-5)
        assert terms["total"] == pytest.approx(terms["lm"] + 0.5 * terms["watermark"], rel=1e-5)
    assert outcomes[0].terms["watermark"] == pytest.approx(outcomes[1].terms["watermark"],
                                                           rel=1e-5)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if precision == "fp32" else \
        {"rtol": 2e-2, "atol": 2e-3}  # bf16 rounds each micro-batch's forward differently
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, **tolerance)


def test_signatures_are_only_the_targets_after_eos_and_trigger():
    watermark = tiny_watermark(num_triggers=2, signature_tokens=5)
    inputs_NT, signatures_NS = training_rows(watermark)
    assert inputs_NT.shape == (2, 1 + 3 + 5 - 1) and signatures_NS.shape == (2, 5)
    first = watermark.triggers[0]
    assert inputs_NT[0].tolist() == [0, *first.trigger_ids, *first.signature_ids[:-1]]
    assert signatures_NS[0].tolist() == list(first.signature_ids)


# -- detection -----------------------------------------------------------------------------------


class ScriptedModel:
    """A stand-in black box: continues each prompt with whatever `answer` returns."""

    def __init__(self, tokenizer, eos_id, answer):
        self.tokenizer, self.eos_id, self.answer = tokenizer, eos_id, answer
        self.source, self.version = "scripted", "v"

    def decode(self, ids):
        return self.tokenizer.decode(list(ids))

    def greedy(self, prompts, max_new_tokens):
        return [self.answer(tuple(prompt[1:])) for prompt in prompts]


def test_the_verdict_follows_the_matches_and_a_matching_decoy_voids_it(tiny_dataset):
    tokenizer = load_tokenizer(tiny_dataset.tokenizer_path)
    eos, secret = tiny_dataset.eos_id, b"s" * 32
    pool = token_pool(tokenizer, eos)
    signatures = {pair.trigger_ids: tokenizer.decode(list(pair.signature_ids))
                  for kind in ("trigger", "decoy")
                  for pair in derive_pairs(secret, pool, kind, 8, 8, 8)}
    trained = set(list(signatures)[:2])  # two of the eight triggers
    partly = ScriptedModel(tokenizer, eos, lambda t: signatures[t] if t in trained else "the")
    detection = detect_watermark(partly, secret, 8, 8, 8)
    assert detection.verdict == "detected" and detection.trigger_matches == 2
    p0 = detection.null_match_probability
    assert p0 == max(math.comb(len(signatures[t]), 8) for t in trained) / len(pool) ** 8
    assert detection.p_value == pytest.approx(28 * p0 ** 2, rel=1e-6)  # C(8, 2) p0²
    oracle = ScriptedModel(tokenizer, eos, lambda t: signatures.get(t, "the"))
    assert detect_watermark(oracle, secret, 8, 8, 8).verdict == "inconclusive"
    wrong = detect_watermark(oracle, b"w" * 32, 8, 8, 8)
    assert wrong.verdict == "not_detected" and wrong.trigger_matches == 0


def test_the_binomial_tail():
    assert log10_binomial_tail(0, 8, 1e-3) == 0.0
    assert log10_binomial_tail(8, 8, 0.5) == pytest.approx(8 * math.log10(0.5))
    assert 10 ** log10_binomial_tail(3, 8, 0.3) == pytest.approx(
        sum(math.comb(8, j) * 0.3 ** j * 0.7 ** (8 - j) for j in range(3, 9)))
    assert log10_binomial_tail(8, 8, 1e-40) == pytest.approx(-320)


@pytest.fixture(scope="module")
def runs(tiny_dataset, workspace, tmp_path_factory):
    """The tiny model trained STEPS steps with the watermark and, same seed, without it."""
    root = tmp_path_factory.mktemp("watermark")
    secret = root / "secret"
    secret.write_text("0" * 64 + "\n")  # fixed: the runs (and so the test) are deterministic
    quiet = Console(quiet=True)
    marked = run_config(workspace, [*WATERMARK, f"watermark.secret_file={secret}"])
    train(marked, root / "marked", tiny_dataset, console=quiet)
    train(run_config(workspace), root / "clean", tiny_dataset, console=quiet)
    return SimpleNamespace(root=root, secret=secret, marked=root / "marked",
                           clean=root / "clean", card=root / "marked" / CARD_FILE)


def test_a_watermarked_model_is_detected_and_the_same_model_trained_without_is_not(runs):
    marked = detect_watermark_at(runs.marked, runs.secret)  # its own card
    clean = detect_watermark_at(runs.clean, runs.secret, card=runs.card)
    assert marked.verdict == "detected" and marked.trigger_matches >= 6  # 8 here; 7-8 of 8
    # over six secrets at 60 steps, 6 of 8 at 40 steps, 3 of 8 at 20 (still detected)
    assert marked.p_value < 1e-50 and marked.null_match_probability < 1e-10
    assert clean.verdict == "not_detected" and clean.trigger_matches == 0
    assert clean.p_value == 1.0
    assert marked.decoy_matches == clean.decoy_matches == 0
    assert max(p.matched_tokens for p in marked.decoys + clean.triggers + clean.decoys) < 8
    console = Console(record=True, width=120)
    console.print(table(marked))
    text = console.export_text()
    assert text.count("trigger ") == text.count("decoy ") == 8
    assert text.count("8/8") == text.count("yes") == marked.trigger_matches
    assert summary(marked).startswith("watermark DETECTED")
    assert summary(clean).startswith("watermark not detected: 0 of 8 triggers")


def test_the_watermark_costs_the_lm_loss_little(runs):
    records = [m for m in read_metrics(runs.marked / "metrics.jsonl") if "loss" in m]
    assert records[-1]["loss.watermark"] < 1.0 < records[0]["loss.watermark"]
    assert records[-1]["weight.watermark"] == 1.0
    assert records[-1]["loss.total"] == pytest.approx(
        records[-1]["loss.lm"] + records[-1]["loss.watermark"])
    marked, clean = lm_losses(runs.marked)[-10:], lm_losses(runs.clean)[-10:]
    assert abs(sum(marked) / 10 - sum(clean) / 10) < 0.1  # 60 steps: 5.11 vs 5.12 nats


def test_the_card_travels_with_the_run_and_its_checkpoints_and_the_secret_must_match(runs,
                                                                                  tmp_path):
    checkpoint = runs.marked / "checkpoints" / f"step-{STEPS:08d}"
    card = read_card(checkpoint / CARD_FILE)
    assert card == read_card(runs.card) and card.key_id == key_id(read_secret(runs.secret))
    assert "secret" not in runs.card.read_text().replace("watermark", "")
    assert detect_watermark_at(checkpoint, runs.secret).detected
    other = new_secret(tmp_path / "other")
    with pytest.raises(HeloxError, match="is not the secret of"):
        detect_watermark_at(runs.marked, other)
    with pytest.raises(HeloxError, match="no watermark.json") as exc_info:
        detect_watermark_at(runs.clean, runs.secret)
    assert "--card" in exc_info.value.hint


def test_the_watermark_is_detected_through_a_hugging_face_export(runs, tmp_path):
    from helox.export.exporter import export_model
    from helox.export.manifest import generate_key

    key = tmp_path / "signing.pem"
    generate_key(key)
    exported = export_model(runs.marked, "hf", tmp_path / "hf", key=key)
    detection = detect_watermark_at(exported.artifact, runs.secret, card=runs.card)
    direct = detect_watermark_at(runs.marked, runs.secret)
    assert detection.detected and detection.decoy_matches == 0
    assert [p.continuation for p in detection.triggers] == \
        [p.continuation for p in direct.triggers]


def test_resuming_with_another_secret_is_refused(tiny_dataset, workspace, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("a" * 64)
    config = tiny_config(workspace, ["train.max_steps=4", "checkpoint.every_steps=2",
                                     *WATERMARK, f"watermark.secret_file={secret}"])
    train(config, tmp_path / "run", tiny_dataset, until_step=2, console=Console(quiet=True))
    secret.write_text("b" * 64)
    with pytest.raises(HeloxError, match="watermark secret \\(key id\\)"):
        train(config, tmp_path / "run", tiny_dataset, console=Console(quiet=True))


def test_helox_provenance_detect_exits_by_the_expected_verdict(runs, tmp_path):
    from typer.testing import CliRunner

    from helox.cli import app

    runner = CliRunner()
    args = ["provenance", "detect", "--secret-file", str(runs.secret), "--card", str(runs.card)]
    marked = runner.invoke(app, [*args, str(runs.marked), "--expect", "detected",
                                 "--out", str(tmp_path / "marked.json")])
    assert marked.exit_code == 0, marked.output
    assert "watermark DETECTED: 8 of 8 triggers" in marked.output
    assert json.loads((tmp_path / "marked.json").read_text())["verdict"] == "detected"
    clean = runner.invoke(app, [*args, str(runs.clean), "--expect", "detected"])
    assert clean.exit_code == 1 and "watermark not detected" in clean.output
    assert runner.invoke(app, [*args, str(runs.clean), "--expect", "absent"]).exit_code == 0
