"""Membership inference against models trained with and without defences: the table of
docs/privacy.md, every row measured by the same attacks (helox.eval.privacy).

The experiment: short documents (CPython docstrings of 300-1000 characters from the bundled
corpus) drawn at random into members (the training set), non-members (the validation split,
never trained on) and a third set the tokenizer is trained on, so that the tokenizer favours
neither side. The model is the tiny test model (d_model 64, 2 layers, 131k parameters), which
memorises 64 short documents within tens of epochs. Each row trains a model, then scores the
first 64 tokens of every member and non-member. Spike skipping and rollbacks are off
(stability.spike and stability.rollback null): a memorising run's loss is erratic enough to
trip them, and every row should be plain training.

Rows:
- control: a model trained on the tokenizer's documents for the reference's steps, attacked on
  the members and non-members it never saw: ~0.5 if the two splits differ only by membership.
- 30 epochs over the members, no weight decay: memorises; every attack saturates (AUC ~1), too
  far gone to tell defences apart, so they are compared against the 10-epoch reference.
- weight decay: optim.weight_decay 0.1 (Helox's default) and 1.0 (AdamW, decoupled, matrices
  only), 10 epochs. Helox's model has no dropout, so there is no dropout row.
- fewer epochs: 3 and 1 (a full LR schedule each).
- duplication (Kandpal et al. 2022): the members with 16 of them repeated 8 times, and the
  same source through the `exact_dedup` pipeline step; both trained for the steps of 3 epochs
  over the unique members. The AUC is also given for the duplicated and the unique members
  apart.
- DP-SGD (Abadi et al. 2016) with opacus: Helox's loop has no per-sample clipping, so these
  rows use a small loop of their own: each sample is one member (EOS + its first 64 tokens),
  drawn by Poisson sampling (expected batch 8); per-sample gradients clipped to norm 1 and
  Gaussian noise added by opacus; epsilon from its RDP accountant at delta 1e-5. Its control
  rows are the same loop without DP (plain shuffled batches) and with clipping only, 10
  epochs each.

Run: .venv/bin/python bench/privacy_defences.py [--workspace DIR] [--json OUT] [--markdown OUT]
(~70 s on 2 idle cores; 14 min when other jobs shared them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import math
import random
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from helox.data.prepare import prepare_dataset
from helox.data.shards import DatasetVersion
from helox.data.tokenizer import load_tokenizer
from helox.eval.lm import LanguageModel, helox_forward, load_language_model
from helox.eval.privacy import (PrivacyReport, membership_inference, run_privacy,
                                sample_documents, sample_membership)
from helox.model.llama import Llama
from helox.observe.metrics import read_metrics
from helox.testing.tiny import CORPUS, tiny_config
from helox.training.loop import train
from helox.training.setup import resolve_vocab_size

NUM_MEMBERS, NUM_NON_MEMBERS, NUM_TOKENIZER_DOCS = 64, 64, 200
NUM_DUPLICATED, COPIES = 16, 8
SCORED_TOKENS = 64
SEQ_LEN, MICRO_BATCH = 64, 8
MEMORISED_EPOCHS = 30
"""Saturates every attack (AUC ~1): too far gone to tell defences apart."""
REFERENCE_EPOCHS = 10
"""The budget the defences are compared at: the undefended model is still clearly caught."""
FEWER_EPOCHS = (3, 1)
DUPLICATION_EPOCHS = 3
"""The steps of 3 epochs over the unique members, for both the duplicated and the deduplicated
data: duplicated members are then seen ~8 times, the others ~1 time."""
DP_SIGMAS = (1.0, 2.0)
"""Noise multipliers: epsilon ~9 and ~3 at delta 1e-5 over 10 epochs (80 steps, q = 1/8)."""
DP_DELTA = 1e-5
DP_BATCH = 8
DP_MAX_GRAD_NORM = 1.0
PROBE_STEPS = 100
"""max_steps of the configs that only prepare a dataset (the steps depend on its size)."""


# ---------------------------------------------------------------------------------------------
# Data


def write_pool(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """members, non_members, tokenizer docs (disjoint, one shuffled pool) and members_dup (the
    members, then COPIES - 1 more copies of the first NUM_DUPLICATED, so exact dedup keeps
    exactly the members, in order)."""
    with lzma.open(CORPUS / "train.jsonl.xz", "rt") as f:
        pool = [doc for doc in map(json.loads, f)
                if doc["domain"] == "technical" and 300 <= len(doc["text"]) <= 1000]
    random.Random(seed).shuffle(pool)
    members = pool[:NUM_MEMBERS]
    sets = {"members": members,
            "non_members": pool[NUM_MEMBERS:NUM_MEMBERS + NUM_NON_MEMBERS],
            "tokenizer": pool[NUM_MEMBERS + NUM_NON_MEMBERS:][:NUM_TOKENIZER_DOCS],
            "members_dup": members + members[:NUM_DUPLICATED] * (COPIES - 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs in sets.items():
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return paths


def config_for(workspace: Path, name: str, train_path: Path, val_path: Path,
               tokenizer: Path | None, steps: int, extra: list[str] = ()):
    overrides = [f"name={name}", f"data.name={name}", f"data.train.0.path={train_path}",
                 f"data.val.0.path={val_path}", f"train.seq_len={SEQ_LEN}",
                 f"train.micro_batch_size={MICRO_BATCH}", f"train.max_steps={steps}",
                 "optim.weight_decay=0", "optim.warmup_steps=10", "train.eval_every_steps=0",
                 f"checkpoint.every_steps={steps}", "checkpoint.keep_last=1",
                 "sample.prompts=[]", "stability.spike=null", "stability.rollback=null", *extra]
    if tokenizer is not None:
        overrides.append(f"tokenizer.path={tokenizer}")
    return tiny_config(workspace, overrides)


def steps_for(dataset: DatasetVersion, epochs: float) -> int:
    train_tokens = sum(s["num_tokens"] for s in dataset.split("train")["shards"])
    return max(1, round(epochs * train_tokens / (SEQ_LEN * MICRO_BATCH)))


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class Row:
    defence: str
    epochs: float
    final_train_loss: float
    report: PrivacyReport
    epsilon: float | None = None
    seconds: float = 0.0
    subsets: dict[str, PrivacyReport] | None = None


def helox_row(defence: str, workspace: Path, config, dataset: DatasetVersion,
              attacked: DatasetVersion | None = None) -> Row:
    """Train with Helox's loop, then the same attacks through run_privacy (on the members and
    non-members of `attacked`, by default the training dataset)."""
    started = time.perf_counter()
    run_dir = workspace / "runs" / config.name
    train(config, run_dir, dataset, console=Console(quiet=True))
    report = run_privacy(run_dir, max_tokens=SCORED_TOKENS,
                         dataset=attacked.path if attacked else None)
    losses = [m["loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]
    train_tokens = sum(s["num_tokens"] for s in dataset.split("train")["shards"])
    epochs = config.train.max_steps * SEQ_LEN * MICRO_BATCH / train_tokens
    return Row(defence, epochs, losses[-1], report, seconds=time.perf_counter() - started)


def duplicated_subsets(run_dir: Path, dataset: DatasetVersion, duplicated_texts: list[str]
                       ) -> dict[str, PrivacyReport]:
    """The attack on the duplicated members and on the unique ones, each vs all non-members."""
    tokenizer = load_tokenizer(dataset.tokenizer_path)
    duplicated = {tuple([dataset.eos_id, *tokenizer.encode(t).ids[:SCORED_TOKENS]])
                  for t in duplicated_texts}
    sample = sample_membership(dataset, max_tokens=SCORED_TOKENS)
    lm = load_language_model(run_dir)
    members = sample.members.sequences
    return {name: membership_inference(lm, [m for m in members if (tuple(m) in duplicated) == dup],
                                       sample.non_members.sequences)
            for name, dup in (("duplicated", True), ("unique", False))}


def dp_row(defence: str, dataset: DatasetVersion, config, epochs: int,
           noise_multiplier: float | None, clip: bool, seed: int = 0) -> Row:
    """A model trained on the members' first SCORED_TOKENS tokens, one sample per member:
    plain AdamW over shuffled batches (noise_multiplier None, clip False), or opacus DP-SGD
    (per-sample clipping to DP_MAX_GRAD_NORM, Gaussian noise of noise_multiplier × that)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    config = resolve_vocab_size(config, dataset)
    model = Llama(config.model)
    members = sample_documents(dataset, "train", 10 * NUM_MEMBERS, max_tokens=SCORED_TOKENS,
                               seed=seed).sequences
    tokens_NT, real_NT = _padded(members, dataset.eos_id)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens_NT, real_NT),
                                         batch_size=DP_BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=0.0,
                                  betas=(config.optim.beta1, config.optim.beta2))
    engine = None
    if clip:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier or 0.0, max_grad_norm=DP_MAX_GRAD_NORM,
            poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed))
    total_steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))))
    model.train()
    loss = float("nan")
    for _ in range(epochs):
        for tokens_BT, real_BT in loader:
            if len(tokens_BT) == 0:  # Poisson sampling drew no one (p ≈ 2e-4): nothing to do
                continue
            loss_B = _sequence_losses(model, tokens_BT, real_BT)
            optimizer.zero_grad(set_to_none=True)
            loss_B.mean().backward()
            optimizer.step()
            schedule.step()
            loss = float(loss_B.detach().mean())
    core = model._module if engine is not None else model
    core.eval()
    epsilon = engine.get_epsilon(DP_DELTA) if engine is not None and noise_multiplier else None
    report = _attack(core, dataset, defence)
    return Row(defence, total_steps * DP_BATCH / len(members), loss, report,
               epsilon=epsilon if clip else None, seconds=time.perf_counter() - started)


def _padded(sequences: list[list[int]], eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    tokens_NT = torch.full((len(sequences), width), eos_id, dtype=torch.long)
    real_NT = torch.zeros(len(sequences), width, dtype=torch.bool)
    for i, s in enumerate(sequences):
        tokens_NT[i, :len(s)] = torch.tensor(s)
        real_NT[i, :len(s)] = True
    return tokens_NT, real_NT


def _sequence_losses(model, tokens_BT: torch.Tensor, real_BT: torch.Tensor) -> torch.Tensor:
    """Mean token NLL of each sequence (padding excluded): one loss per sample, as DP-SGD
    clips per sample."""
    logits_BTV = model(tokens_BT[:, :-1])
    nll_BT = F.cross_entropy(logits_BTV.transpose(1, 2), tokens_BT[:, 1:], reduction="none")
    mask_BT = real_BT[:, 1:].float()
    return (nll_BT * mask_BT).sum(1) / mask_BT.sum(1)


def _attack(model: Llama, dataset: DatasetVersion, name: str) -> PrivacyReport:
    lm = LanguageModel(helox_forward(model), load_tokenizer(dataset.tokenizer_path),
                       dataset.eos_id, model.cfg.max_seq_len, model.cfg.vocab_size, name, name,
                       torch.device("cpu"))
    sample = sample_membership(dataset, max_tokens=SCORED_TOKENS)
    return membership_inference(lm, sample.members.sequences, sample.non_members.sequences)


# ---------------------------------------------------------------------------------------------
# Tables


def auc_cell(report: PrivacyReport, attack: str) -> str:
    auc = report.attack(attack).auc
    return f"{auc.value:.3f} [{auc.low:.2f}, {auc.high:.2f}]"


MAIN_COLUMNS = ("defence", "epochs", "final train loss", "member loss", "val loss",
                "loss AUC [95% CI]", "min-k 20% AUC [95% CI]", "zlib AUC",
                "TPR@10%FPR (loss)", "ε (δ=1e-5)", "s")
DUPLICATION_COLUMNS = ("training data", "epochs", "all members", f"{NUM_DUPLICATED} duplicated",
                       f"{NUM_MEMBERS - NUM_DUPLICATED} unique", "val loss")


def main_cells(row: Row) -> list[str]:
    r = row.report
    return [row.defence, f"{row.epochs:.1f}", f"{row.final_train_loss:.3f}",
            f"{r.member_loss_nats.value:.3f}", f"{r.non_member_loss_nats.value:.3f}",
            auc_cell(r, "loss"), auc_cell(r, "min_k"), f"{r.attack('zlib').auc.value:.3f}",
            f"{r.attack('loss').tpr_at_fpr[0.1]:.0%}",
            "∞" if row.epsilon is None else f"{row.epsilon:.1f}", f"{row.seconds:.0f}"]


def duplication_cells(row: Row) -> list[str]:
    return [row.defence, f"{row.epochs:.1f}", auc_cell(row.report, "loss"),
            auc_cell(row.subsets["duplicated"], "loss"), auc_cell(row.subsets["unique"], "loss"),
            f"{row.report.non_member_loss_nats.value:.3f}"]


def rich_table(title: str, columns: tuple[str, ...], cells: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    return table


def markdown_table(columns: tuple[str, ...], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |",
             "| --- |" + " ---: |" * (len(columns) - 1)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in cells)]) + "\n"


def row_record(row: Row) -> dict:
    return {"defence": row.defence, "epochs": row.epochs,
            "final_train_loss": row.final_train_loss, "epsilon": row.epsilon,
            "seconds": row.seconds, "report": row.report.as_dict(),
            "subsets": {k: v.as_dict() for k, v in (row.subsets or {}).items()}}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=None,
                        help="where datasets and runs go (default: a fresh temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="also write both tables here as Markdown (docs/privacy.md)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="helox-privacy-"))
    console = Console(width=200)
    started = time.perf_counter()
    paths = write_pool(workspace / "pool")

    tok_config = config_for(workspace, "tok", paths["tokenizer"], paths["non_members"], None,
                           PROBE_STEPS)
    tokenizer = prepare_dataset(tok_config).tokenizer_path

    def helox(defence, name, train_path, epochs=REFERENCE_EPOCHS, extra=(), steps=None,
              attacked=None):
        probe = config_for(workspace, name, train_path, paths["non_members"], tokenizer,
                           PROBE_STEPS, list(extra))
        dataset = prepare_dataset(probe)
        config = config_for(workspace, name, train_path, paths["non_members"], tokenizer,
                             steps or steps_for(dataset, epochs), list(extra))
        row = helox_row(defence, workspace, config, dataset, attacked)
        console.print(f"{defence}: loss AUC {auc_cell(row.report, 'loss')} "
                      f"({row.seconds:.0f} s)")
        return row, config, dataset

    rows = [helox(f"{MEMORISED_EPOCHS} epochs, no defence", "ep30", paths["members"],
                  MEMORISED_EPOCHS)[0]]
    reference, reference_config, members = helox(
        f"{REFERENCE_EPOCHS} epochs, no defence (reference)", "ep10", paths["members"])
    rows.append(reference)
    rows.append(helox("control: other documents, never the members", "control",
                      paths["tokenizer"], steps=reference_config.train.max_steps,
                      attacked=members)[0])
    for decay in (0.1, 1.0):
        rows.append(helox(f"{REFERENCE_EPOCHS} epochs + weight decay {decay}", f"ep10-wd{decay}",
                          paths["members"], extra=[f"optim.weight_decay={decay}"])[0])
    for epochs in FEWER_EPOCHS:
        rows.append(helox(f"fewer epochs: {epochs}", f"ep{epochs}", paths["members"],
                          epochs)[0])

    duplication_steps = steps_for(members, DUPLICATION_EPOCHS)
    duplicated_texts = [json.loads(line)["text"] for line in
                        paths["members"].read_text().splitlines()[:NUM_DUPLICATED]]
    dup_rows = []
    for defence, name, extra in (("with duplicates", "dup", []),
                                 ("exact_dedup", "dedup",
                                  ["data.pipeline=[{step: exact_dedup}]"])):
        row, config, dataset = helox(defence, name, paths["members_dup"], extra=extra,
                                     steps=duplication_steps)
        row.subsets = duplicated_subsets(workspace / "runs" / name, dataset, duplicated_texts)
        dup_rows.append(row)
        same = "the same as" if dataset.version == members.version else "unlike"
        console.print(f"{defence}: dataset {dataset.version}, {same} the members' dataset")

    dp_settings = [("own loop, no DP", None, False),
                   ("own loop, per-sample clipping only (σ=0)", 0.0, True),
                   *((f"DP-SGD σ={sigma}", sigma, True) for sigma in DP_SIGMAS)]
    if importlib.util.find_spec("opacus") is None:
        console.print("opacus is not installed: no DP-SGD rows (pip install opacus==1.6.0 "
                      "-c requirements/constraints.txt)")
        dp_settings = dp_settings[:1]
    for defence, sigma, clip in dp_settings:
        row = dp_row(defence, members, reference_config, REFERENCE_EPOCHS, sigma, clip)
        console.print(f"{defence}: loss AUC {auc_cell(row.report, 'loss')} "
                      f"({row.seconds:.0f} s)")
        rows.append(row)

    main_rows = [main_cells(r) for r in rows]
    dup_cells = [duplication_cells(r) for r in dup_rows]
    console.print(rich_table(f"Membership inference vs defences ({NUM_MEMBERS} members, "
                             f"{NUM_NON_MEMBERS} non-members, first {SCORED_TOKENS} tokens)",
                             MAIN_COLUMNS, main_rows))
    console.print(rich_table(f"Duplication: {NUM_DUPLICATED} of {NUM_MEMBERS} members repeated "
                             f"{COPIES}×, and exact dedup, same steps (loss attack AUC)",
                             DUPLICATION_COLUMNS, dup_cells))
    if args.markdown:
        args.markdown.write_text(markdown_table(MAIN_COLUMNS, main_rows) + "\n"
                                 + markdown_table(DUPLICATION_COLUMNS, dup_cells))
    console.print(f"total {time.perf_counter() - started:.0f} s; workspace {workspace}")
    if args.json:
        args.json.write_text(json.dumps({"rows": [row_record(r) for r in rows],
                                         "duplication": [row_record(r) for r in dup_rows]},
                                        indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
