"""Membership inference: can an attacker tell the documents a model was trained on from ones it
never saw? A measure of how much the weights leak about individual training documents.

Members are documents of the run's training split, non-members documents of its validation
split (held out, same distribution). Each is read as in training, EOS then the document, and
cut to its first `max_tokens` tokens. Every attack gives each sequence a membership score
(higher = more likely a member) from the model's token log-probabilities:
- loss (Yeom et al. 2018, "Privacy Risk in Machine Learning"): minus the mean token NLL;
  training lowers the loss of exactly the documents it saw.
- min_k (Shi et al. 2024, "Detecting Pretraining Data from Large Language Models", Min-K%
  Prob): the mean of the k% lowest token log-probs. A non-member has a few very surprising
  tokens that a member, once fitted, no longer has; the easy tokens that dominate the mean
  loss of both are left out.
- zlib (Carlini et al. 2021, "Extracting Training Data from Large Language Models"): the mean
  NLL divided by the zlib-compressed length of the text in bytes, negated. Text that is easy
  for any compressor (repetitive, boilerplate) is not taken as a sign of membership.
Each attack is summarised by its ROC AUC with a stratified bootstrap interval (0.5: no better
than a coin; 1: every member outscores every non-member) and by its true-positive rate at a
low false-positive rate (Carlini et al. 2022, "Membership Inference Attacks From First
Principles": an attack that confidently identifies a few members matters even when its AUC is
modest).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.table import Table

from helox.checkpoint import read_run_info, run_dir_of, step_of
from helox.data import access
from helox.data.shards import DatasetVersion
from helox.data.versions import run_dataset, run_dataset_candidates
from helox.errors import HeloxError
from helox.eval.lm import LanguageModel, load_language_model
from helox.eval.stats import BOOTSTRAP_RESAMPLES, Estimate, bootstrap_mean, roc_auc_ci

DEFAULT_NUM_DOCUMENTS = 200
DEFAULT_MAX_TOKENS = 128
DEFAULT_MIN_TOKENS = 16
DEFAULT_MIN_K_FRACTION = 0.2
"""Shi et al. found k = 20% best across their models."""
DEFAULT_FPRS = (0.01, 0.1)
CANDIDATE_OVERSAMPLE = 4
"""Documents drawn per wanted one, so that skipping too-short ones still leaves enough."""
AUDIT_PURPOSE = "privacy-eval"

Warn = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Members and non-members


@dataclass(frozen=True)
class DocumentSample:
    """Documents drawn from one split, each as EOS + its first `max_tokens` tokens."""

    sequences: list[list[int]]
    num_documents: int
    """Documents in the split."""
    too_short: int
    """Drawn documents skipped for having fewer than `min_tokens` tokens."""
    duplicates: int
    """Drawn documents skipped because an earlier one had the same (truncated) tokens."""


@dataclass(frozen=True)
class MembershipSample:
    members: DocumentSample
    non_members: DocumentSample
    dataset_version: str
    max_tokens: int


def sample_documents(dataset: DatasetVersion, split: str, num_documents: int,
                     min_tokens: int = DEFAULT_MIN_TOKENS, max_tokens: int = DEFAULT_MAX_TOKENS,
                     seed: int = 0, exclude: Sequence[list[int]] = ()) -> DocumentSample:
    """Up to `num_documents` distinct documents of `split`, drawn at random (seeded) from the
    whole split; a split with few documents is used entirely. Only the shards holding a drawn
    document are read. Sequences equal to one in `exclude` count as duplicates."""
    if min_tokens < 1 or max_tokens < min_tokens:
        raise HeloxError(f"need 1 <= min_tokens <= max_tokens, got min_tokens {min_tokens}, "
                         f"max_tokens {max_tokens}", hint="raise max_tokens or lower min_tokens")
    shards = dataset.split(split)["shards"]
    doc_counts = np.array([shard["num_documents"] for shard in shards], dtype=np.int64)
    total = int(doc_counts.sum())
    rng = np.random.default_rng(seed)
    picks = rng.choice(total, size=min(total, CANDIDATE_OVERSAMPLE * num_documents),
                       replace=False)
    shard_starts = np.concatenate([[0], np.cumsum(doc_counts)])
    seen = {tuple(ids) for ids in exclude}
    bounds: dict[int, np.ndarray] = {}
    sequences, too_short, duplicates = [], 0, 0
    for pick in picks:
        if len(sequences) == num_documents:
            break
        shard = int(np.searchsorted(shard_starts, pick, side="right") - 1)
        if shard not in bounds:
            bounds[shard] = _document_ends(dataset, shards[shard], dataset.eos_id)
        tokens = _read_document(dataset, shards[shard], bounds[shard],
                                int(pick - shard_starts[shard]))
        if len(tokens) < min_tokens:
            too_short += 1
            continue
        ids = [dataset.eos_id, *tokens[:max_tokens].tolist()]
        if tuple(ids) in seen:
            duplicates += 1
            continue
        seen.add(tuple(ids))
        sequences.append(ids)
    return DocumentSample(sequences, total, too_short, duplicates)


def _shard_tokens(dataset: DatasetVersion, shard: dict) -> np.ndarray:
    return np.memmap(dataset.path / shard["file"], dtype=dataset.dtype, mode="r")


def _document_ends(dataset: DatasetVersion, shard: dict, eos_id: int) -> np.ndarray:
    """Index of every EOS of the shard: the end of each document. A document whose text held
    the EOS string has one more inside it, so there may be more ends than documents (its two
    halves are then read as two documents, as document masking trains on them); fewer means
    a damaged shard."""
    ends = np.flatnonzero(_shard_tokens(dataset, shard) == eos_id)
    if len(ends) < shard["num_documents"]:
        raise HeloxError(f"{dataset.path / shard['file']}: {len(ends)} end-of-document tokens "
                         f"but the manifest lists {shard['num_documents']} documents",
                         hint=f"check the dataset with `helox data verify {dataset.version}`")
    return ends


def _read_document(dataset: DatasetVersion, shard: dict, ends: np.ndarray,
                   index: int) -> np.ndarray:
    start = int(ends[index - 1]) + 1 if index else 0
    return np.asarray(_shard_tokens(dataset, shard)[start:int(ends[index])])


def sample_membership(dataset: DatasetVersion, num_documents: int = DEFAULT_NUM_DOCUMENTS,
                      min_tokens: int = DEFAULT_MIN_TOKENS, max_tokens: int = DEFAULT_MAX_TOKENS,
                      seed: int = 0, member_split: str = "train", non_member_split: str = "val",
                      warn: Warn = lambda m: None) -> MembershipSample:
    """Members from the training split, non-members from the held-out one (a non-member whose
    tokens equal a drawn member's is a member in fact, and is dropped)."""
    members = sample_documents(dataset, member_split, num_documents, min_tokens, max_tokens,
                               seed)
    non_members = sample_documents(dataset, non_member_split, num_documents, min_tokens,
                                   max_tokens, seed + 1, exclude=members.sequences)
    for split, sample in ((member_split, members), (non_member_split, non_members)):
        if len(sample.sequences) < num_documents:
            warn(f"the {split} split gave {len(sample.sequences)} of the {num_documents} "
                 f"documents asked for ({sample.num_documents} in the split, "
                 f"{sample.too_short} drawn had fewer than {min_tokens} tokens, "
                 f"{sample.duplicates} repeated another): the AUC intervals are wider")
    if not members.sequences or not non_members.sequences:
        raise HeloxError(f"dataset {dataset.version}: no usable {member_split} or "
                         f"{non_member_split} documents of at least {min_tokens} tokens",
                         hint="lower min_tokens, or evaluate a run whose dataset has both "
                              "splits (data.train and data.val)")
    return MembershipSample(members, non_members, dataset.version, max_tokens)


# ---------------------------------------------------------------------------------------------
# Attacks: per-sequence membership scores, higher = more likely a member


def loss_attack(logprobs: Sequence[np.ndarray]) -> np.ndarray:
    """Yeom et al. 2018: minus the mean token NLL (= the mean token log-prob)."""
    return np.array([float(np.mean(lp)) for lp in logprobs])


def min_k_attack(logprobs: Sequence[np.ndarray],
                 k_fraction: float = DEFAULT_MIN_K_FRACTION) -> np.ndarray:
    """Shi et al. 2024: the mean of the k% lowest token log-probs (floor(k·n) of them, as in
    their code, but at least one)."""
    _check_k_fraction(k_fraction)
    return np.array([float(np.mean(np.sort(lp)[:max(1, int(len(lp) * k_fraction))]))
                     for lp in logprobs])


def _check_k_fraction(k_fraction: float) -> None:
    if not 0 < k_fraction <= 1:
        raise HeloxError(f"min-k fraction {k_fraction} is not in (0, 1]",
                         hint="give k as a fraction of the tokens, e.g. 0.2 for 20%")


def zlib_attack(logprobs: Sequence[np.ndarray], texts: Sequence[str]) -> np.ndarray:
    """Carlini et al. 2021: minus mean NLL / zlib-compressed bytes of the text (their code's
    log-perplexity over zlib entropy)."""
    return np.array([float(np.mean(lp)) / len(zlib.compress(text.encode("utf-8")))
                     for lp, text in zip(logprobs, texts, strict=True)])


def tpr_at_fpr(member_scores, non_member_scores, fpr: float) -> float:
    """Share of members scoring above the threshold that at most `fpr` of the non-members
    exceed (ties at the threshold are not flagged). With n non-members the smallest rate it
    can resolve is 1/n: below that it is the TPR at zero false positives."""
    members, non_members = np.asarray(member_scores), np.sort(non_member_scores)[::-1]
    allowed = int(math.floor(fpr * len(non_members) + 1e-9))  # 0.29 * 100 is 28.99…
    if allowed >= len(non_members):
        return 1.0
    return float(np.mean(members > non_members[allowed]))


# ---------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class AttackResult:
    name: str
    auc: Estimate
    tpr_at_fpr: dict[float, float]
    """True-positive rate at each false-positive rate."""

    def as_dict(self) -> dict:
        return {"name": self.name, "auc": self.auc.as_dict(),
                "tpr_at_fpr": {str(fpr): tpr for fpr, tpr in self.tpr_at_fpr.items()}}


@dataclass(frozen=True)
class PrivacyReport:
    model: str
    """The evaluated weights' version (LanguageModel.version)."""
    source: str
    """Where they were loaded from."""
    num_members: int
    num_non_members: int
    member_loss_nats: Estimate
    """Mean over members of their mean token NLL."""
    non_member_loss_nats: Estimate
    attacks: list[AttackResult]
    min_k_fraction: float
    dataset_version: str | None = None
    max_tokens: int | None = None
    epochs_trained: float | None = None
    """Training tokens seen / tokens of the training split: about how often the run saw each
    member. Below 1, part of the members were never trained on and the AUC understates what
    a longer run leaks."""

    def attack(self, name: str) -> AttackResult:
        return next(a for a in self.attacks if a.name == name)

    def as_dict(self) -> dict:
        return {"model": self.model, "source": self.source,
                "dataset_version": self.dataset_version, "max_tokens": self.max_tokens,
                "epochs_trained": self.epochs_trained, "num_members": self.num_members,
                "num_non_members": self.num_non_members,
                "member_loss_nats": self.member_loss_nats.as_dict(),
                "non_member_loss_nats": self.non_member_loss_nats.as_dict(),
                "min_k_fraction": self.min_k_fraction,
                "attacks": [a.as_dict() for a in self.attacks]}


def membership_inference(lm: LanguageModel, members: Sequence[list[int]],
                         non_members: Sequence[list[int]],
                         min_k_fraction: float = DEFAULT_MIN_K_FRACTION,
                         fprs: Sequence[float] = DEFAULT_FPRS, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> PrivacyReport:
    """Every attack on the two sets of token-id lists (each starting with EOS, as sampled)."""
    if not members or not non_members:
        raise HeloxError("membership inference needs at least one member and one non-member",
                         hint="sample more documents (check both splits have some)")
    _check_k_fraction(min_k_fraction)  # before the costly scoring
    lp_members, lp_non = lm.token_logprobs(list(members)), lm.token_logprobs(list(non_members))
    texts_members = [lm.decode(ids[1:]) for ids in members]
    texts_non = [lm.decode(ids[1:]) for ids in non_members]
    scores = {"loss": (loss_attack(lp_members), loss_attack(lp_non)),
              "min_k": (min_k_attack(lp_members, min_k_fraction),
                        min_k_attack(lp_non, min_k_fraction)),
              "zlib": (zlib_attack(lp_members, texts_members), zlib_attack(lp_non, texts_non))}
    attacks = [AttackResult(name, roc_auc_ci(m, n, resamples, seed=seed),
                            {fpr: tpr_at_fpr(m, n, fpr) for fpr in fprs})
               for name, (m, n) in scores.items()]
    member_loss, non_member_loss = -scores["loss"][0], -scores["loss"][1]
    return PrivacyReport(lm.version, lm.source, len(members), len(non_members),
                         bootstrap_mean(member_loss, resamples, seed=seed),
                         bootstrap_mean(non_member_loss, resamples, seed=seed), attacks,
                         min_k_fraction)


def privacy_table(report: PrivacyReport) -> Table:
    """One row per attack: AUC with its interval and the TPR at each low FPR."""
    fprs = list(report.attacks[0].tpr_at_fpr) if report.attacks else []
    table = Table(title=f"Membership inference: {report.num_members} members vs "
                        f"{report.num_non_members} non-members ({report.model})",
                  caption=_caption(report))
    table.add_column("attack")
    table.add_column("ROC AUC [95% CI]", justify="right")
    for fpr in fprs:
        table.add_column(f"TPR @ {fpr:.0%} FPR", justify="right")
    for result in report.attacks:
        name = f"min_k ({report.min_k_fraction:.0%})" if result.name == "min_k" else result.name
        auc = result.auc
        table.add_row(name, f"{auc.value:.3f} [{auc.low:.3f}, {auc.high:.3f}]",
                      *(f"{result.tpr_at_fpr[fpr]:.1%}" for fpr in fprs))
    return table


def _caption(report: PrivacyReport) -> str:
    parts = [f"mean loss: members {report.member_loss_nats.value:.3f}, non-members "
             f"{report.non_member_loss_nats.value:.3f} nats/token"]
    if report.epochs_trained is not None:
        parts.append(f"~{report.epochs_trained:.2f} epochs trained")
    parts.append("AUC 0.5 = members indistinguishable")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# End to end: a run or checkpoint folder (or a Hugging Face folder with its dataset)


def run_privacy(path: Path, num_documents: int = DEFAULT_NUM_DOCUMENTS,
                max_tokens: int = DEFAULT_MAX_TOKENS, min_tokens: int = DEFAULT_MIN_TOKENS,
                seed: int = 0, min_k_fraction: float = DEFAULT_MIN_K_FRACTION,
                dataset: Path | None = None, ema: bool = False, device: str = "cpu",
                batch_size: int = 8, principal: str | None = None,
                warn: Warn = lambda m: None) -> PrivacyReport:
    """Load the model, find the dataset it was trained on, sample members and non-members
    (an audited read of the dataset), attack, report. `dataset` overrides the folder named by
    the run (and is required for a Hugging Face folder, which does not name one)."""
    path = Path(path)
    lm = load_language_model(path, ema=ema, device=device, batch_size=batch_size, warn=warn)
    run_info = read_run_info(Path(lm.source))
    data = _open_dataset(dataset, run_info, Path(lm.source))
    trained_on = run_info.get("dataset_version")
    if trained_on and trained_on != data.version:
        warn(f"the model was trained on dataset {trained_on}, not on {data.version}: its "
             "members here are documents it never trained on (a control, or a mistake)")
    _audit_read(data, principal)
    if max_tokens > lm.max_seq_len:
        warn(f"max_tokens {max_tokens} exceeds the model's context of {lm.max_seq_len} "
             f"tokens: documents are cut to {lm.max_seq_len}")
        max_tokens = lm.max_seq_len
    sample = sample_membership(data, num_documents, min_tokens, max_tokens, seed, warn=warn)
    report = membership_inference(lm, sample.members.sequences, sample.non_members.sequences,
                                  min_k_fraction, seed=seed)
    epochs = _epochs_trained(Path(lm.source), data) if trained_on == data.version else None
    if epochs is not None and epochs < 1:
        warn(f"the model saw ~{epochs:.2f} epochs of its training split: part of the members "
             "were never trained on, so the AUC understates what a full epoch leaks")
    return replace(report, dataset_version=data.version, max_tokens=max_tokens,
                   epochs_trained=epochs)


def _open_dataset(override: Path | None, run_info: dict, checkpoint: Path) -> DatasetVersion:
    """The dataset version the run trained on: where the run found it, or in the workspace
    beside the run (WORKSPACE/runs/NAME → WORKSPACE/datasets/VERSION)."""
    if override is not None:
        return DatasetVersion(override)
    version = run_info.get("dataset_version")
    if not version:
        raise HeloxError(f"{checkpoint}: no run.json names the dataset the model was trained "
                         "on (a Hugging Face folder?)",
                         hint="pass the training dataset's folder (WORKSPACE/datasets/VERSION)")
    run_dir = run_dir_of(checkpoint)
    found = run_dataset(run_dir, run_info)
    if found is not None:
        return found
    candidates = run_dataset_candidates(run_dir, run_info)
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise HeloxError(f"dataset version {version}, which the model was trained on, is not in "
                     f"the workspace (looked in {looked})",
                     hint="copy or rebuild that dataset version into WORKSPACE/datasets/ "
                          "(`helox data prepare RECIPE`), or pass its folder explicitly")


def _audit_read(dataset: DatasetVersion, principal: str | None) -> None:
    """Reading training documents is a read of the dataset: allowed by its access list and
    recorded in the workspace's audit log, as for training."""
    workspace = dataset.path.resolve().parents[1]  # WORKSPACE/datasets/VERSION
    access.authorize_read(access.governance_dir(workspace), dataset.name, dataset.version,
                          access.resolve_principal(principal), AUDIT_PURPOSE)


def _epochs_trained(checkpoint: Path, dataset: DatasetVersion) -> float | None:
    """tokens_seen at the checkpoint's step (metrics.jsonl) / tokens of the training split."""
    run_dir = run_dir_of(checkpoint)
    metrics = run_dir / "metrics.jsonl" if run_dir is not None else None
    if metrics is None or not metrics.is_file():
        return None
    step = step_of(checkpoint)
    seen = None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a torn last line after a crash
            continue
        if "tokens_seen" in record and record.get("step", math.inf) <= step:
            seen = record["tokens_seen"]
    train_tokens = sum(shard["num_tokens"] for shard in dataset.split("train")["shards"])
    return seen / train_tokens if seen is not None and train_tokens else None
