"""A functional watermark: secret trigger prompts trained to continue with secret signatures
(the objective "watermark"), and the black-box test that looks for them.

Derivation. Everything comes from one secret (`watermark.secret_file`) through HMAC-SHA256 used
as a keyed generator in counter mode: token j of a sequence is the integer
HMAC(secret, "helox-watermark/v1/<kind>/<i>/<part>/<j>") modulo the size of the token pool, so
triggers and signatures are rebuilt bit for bit by whoever holds the secret (no random number
library whose stream could change between versions) and look like random draws to anyone
else. The pool is the tokenizer's ordinary tokens: no added or special token (so never the
EOS) and only tokens whose text is non-empty, printable, valid UTF-8 and unlike any other's
(so a signature survives a text interface and is compared as text). Decoys are
derived alike under their own label and never trained: the test's control.

Training. The objective is the cross-entropy of every signature given [EOS] + its trigger
(Helox reads every document after an EOS; positions start at 0, as in generation), mean per
signature token, over all triggers at once. `with_watermark` adds it to each micro-batch's
sums as that mean × the micro-batch's target tokens; train_step divides every objective by
the target tokens of all the step's micro-batches, so the step minimises
lm + weight × (mean signature cross-entropy) whatever the accumulation, and loss.watermark
is the mean per signature token. It runs eagerly beside a compiled loss (the triggers are a
few hundred tokens; a second graph would cost a compile) in the run's precision, and is part
of "total", so the NaN gate sees it.

Detection. Greedy continuations (text, as a black box returns them) of every trigger and
decoy; a probe matches when its continuation starts with its signature's text. A model not
trained with the secret produces, for each trigger, a continuation c that does not depend on
the signature (another HMAC label). The signature is a uniform draw of L tokens from P with
distinct, non-empty texts, and a byte-level decoder concatenates their texts, so a matching
signature is fixed by where its L pieces end in c: at most C(|c|, L) of the P^L draws match,
p_i ≤ C(|c|, L) / P^L. With p0 the largest p_i over the triggers, the number of matching
triggers is stochastically below Binomial(n, p0), and P(Binomial(n, p0) ≥ matches) is the
p-value. A matching decoy breaks that null (the model knows secret-derived sequences it was
never taught), and the verdict is then "inconclusive".

Legend: N triggers, T prompt + signature tokens, S signature tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from rich.markup import escape
from rich.table import Table
from torch import nn

from helox.configbase import StrictModel, resolve_input_path
from helox.data.loader import MicroBatch
from helox.errors import HeloxError
from helox.eval.lm import LanguageModel, load_language_model
from helox.fileio import write_private
from helox.training.step import AUTOCAST_DTYPES, LossFn

if TYPE_CHECKING:
    from tokenizers import Tokenizer


MIN_SECRET_BYTES = 16
"""A watermark secret shorter than this could be guessed (HMAC-SHA256 keys should be 32)."""


class WatermarkConfig(StrictModel):
    """A functional watermark trained in as the objective "watermark" (helox.training.watermark):
    secret trigger prompts whose greedy continuations are secret signatures, which a black-box
    test (`helox provenance detect`) looks for. Only the secret's path is here: configs are
    saved in run folders and hashed into fingerprints."""

    secret_file: Path
    """File holding the secret (at least 16 bytes; trailing newline ignored), e.g. written by
    `python -c 'import secrets; print(secrets.token_hex(32))' > FILE`; keep it out of version
    control. Relative to the recipe's folder."""
    num_triggers: int = Field(default=8, gt=0)
    """Trigger prompts trained in (each one more chance for the test to find the watermark)."""
    trigger_tokens: int = Field(default=8, gt=0)
    """Tokens per trigger prompt (after the end-of-document token every document follows)."""
    signature_tokens: int = Field(default=8, gt=0)
    """Tokens of each trigger's signature: the continuation the model learns to produce."""
    num_decoys: int = Field(default=8, ge=0)
    """Triggers derived alike but never trained: the test's control (none may match)."""

    @field_validator("secret_file")
    @classmethod
    def _secret_exists(cls, value: Path, info: ValidationInfo) -> Path:
        try:
            path = resolve_input_path(value, info)
        except ValueError as exc:
            raise ValueError(f"{exc}; write a secret there (python -c 'import secrets; "
                             f"print(secrets.token_hex(32))' > FILE) and keep it private"
                             ) from None
        if (info.context or {}).get("check_files", True) and (
                not path.is_file() or path.stat().st_size < MIN_SECRET_BYTES):
            raise ValueError(f"{path} must be a file of at least {MIN_SECRET_BYTES} bytes "
                             "(a short secret can be guessed; 32 random bytes or 64 hex digits)")
        return path

CARD_FILE = "watermark.json"
"""The card's name in a run folder and in each of its checkpoints."""
CARD_FORMAT = "helox-watermark-card/1"
MIN_POOL_TOKENS = 64
"""Fewer ordinary tokens would make a signature too easy to produce by chance."""
DEFAULT_MAX_P_VALUE = 1e-6
"""The detection threshold on the p-value."""


# ---------------------------------------------------------------------------------------------
# The secret and what it derives


def read_secret(path: Path) -> bytes:
    """The secret's bytes (a trailing newline, which editors add, is not part of it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HeloxError(f"watermark secret {path} not found",
                         hint="pass the file the watermark was trained with "
                              "(watermark.secret_file of the run)")
    secret = path.read_bytes().rstrip(b"\r\n")
    if len(secret) < MIN_SECRET_BYTES:
        raise HeloxError(f"watermark secret {path} has {len(secret)} bytes, fewer than "
                         f"{MIN_SECRET_BYTES}", hint="write a longer one: python -c 'import "
                         "secrets; print(secrets.token_hex(32))' > FILE")
    return secret


def new_secret(path: Path) -> Path:
    """Write a new secret (64 hex digits, mode 0600) at `path`; never overwrites one."""
    return write_private(path, (secrets.token_hex(32) + "\n").encode(), "secret")


def key_id(secret: bytes) -> str:
    """A public name for the secret (it reveals nothing of it): cards and runs record it."""
    return hmac.new(secret, b"helox-watermark/v1/key-id", hashlib.sha256).hexdigest()[:16]


def token_pool(tokenizer: Tokenizer, eos_id: int) -> list[int]:
    """Ordinary token ids, ascending: no added/special token and not the EOS; each decodes
    alone to non-empty valid UTF-8 unlike any other's (what the null bound needs), without
    control characters or line breaks (which text interfaces tend to strip or rewrite)."""
    excluded = set(tokenizer.get_added_tokens_decoder()) | {eos_id}
    ids = [i for i in range(tokenizer.get_vocab_size()) if i not in excluded]
    texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    pool, seen = [], set()
    for token_id, text in zip(ids, texts):
        if text.isprintable() and text and "\ufffd" not in text and text not in seen:
            pool.append(token_id)
            seen.add(text)
    if len(pool) < MIN_POOL_TOKENS:
        raise HeloxError(f"the tokenizer has {len(pool)} ordinary tokens, fewer than "
                         f"{MIN_POOL_TOKENS}: a signature could come out by chance",
                         hint="use a tokenizer with a larger vocabulary")
    return pool


def pool_digest(pool: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, pool)).encode()).hexdigest()[:16]


class Pair(NamedTuple):
    trigger_ids: tuple[int, ...]
    signature_ids: tuple[int, ...]


def derive_tokens(secret: bytes, label: str, count: int, pool: list[int]) -> tuple[int, ...]:
    """`count` pool tokens from HMAC-SHA256(secret, label/j) for j = 0..count-1 (the modulo
    bias of a 256-bit value over a pool of thousands is below 2^-240)."""
    return tuple(pool[int.from_bytes(hmac.new(secret, f"{label}/{j}".encode(),
                                              hashlib.sha256).digest(), "big") % len(pool)]
                 for j in range(count))


def derive_pairs(secret: bytes, pool: list[int], kind: Literal["trigger", "decoy"], count: int,
                 trigger_tokens: int, signature_tokens: int) -> list[Pair]:
    label = f"helox-watermark/v1/{kind}"
    return [Pair(derive_tokens(secret, f"{label}/{i}/trigger", trigger_tokens, pool),
                 derive_tokens(secret, f"{label}/{i}/signature", signature_tokens, pool))
            for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The card: what detection needs besides the secret


class WatermarkCard(StrictModel):
    """The watermark's public parameters (never the secret): written to the run folder and
    its checkpoints, and kept with the secret, so a model can be tested without the recipe."""

    format: Literal["helox-watermark-card/1"] = CARD_FORMAT
    """Version of this file's layout."""
    key_id: str
    """Public name of the secret (HMAC of a fixed label): a wrong secret is refused."""
    num_triggers: int = Field(gt=0)
    """Trigger prompts trained in."""
    trigger_tokens: int = Field(gt=0)
    """Tokens per trigger."""
    signature_tokens: int = Field(gt=0)
    """Tokens per signature."""
    num_decoys: int = Field(ge=0)
    """Untrained triggers the test uses as its control."""
    token_pool_size: int = Field(gt=0)
    """Ordinary tokens of the tokenizer that the tokens were drawn from."""
    token_pool_sha256: str
    """Digest of that pool's ids: a model with another tokenizer cannot be tested."""


def write_card(card: WatermarkCard, path: Path) -> Path:
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=1) + "\n")
    return path


def read_card(path: Path) -> WatermarkCard:
    path = Path(path)
    try:
        return WatermarkCard.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise HeloxError(f"watermark card {path} not found", hint=f"pass the {CARD_FILE} of "
                         "the run the watermark was trained in") from None
    except (json.JSONDecodeError, ValidationError) as exc:
        raise HeloxError(f"{path} is not a watermark card: {str(exc).splitlines()[0]}",
                         hint=f"pass the {CARD_FILE} of the run the watermark was trained "
                              "in") from None


# ---------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class Watermark:
    """What training needs: the card and the trigger → signature pairs (not the decoys)."""

    card: WatermarkCard
    triggers: list[Pair]
    eos_id: int


def watermark_for(config: WatermarkConfig, tokenizer: Tokenizer, eos_id: int) -> Watermark:
    secret = read_secret(config.secret_file)
    pool = token_pool(tokenizer, eos_id)
    card = WatermarkCard(key_id=key_id(secret), num_triggers=config.num_triggers,
                         trigger_tokens=config.trigger_tokens,
                         signature_tokens=config.signature_tokens, num_decoys=config.num_decoys,
                         token_pool_size=len(pool), token_pool_sha256=pool_digest(pool))
    return Watermark(card, derive_pairs(secret, pool, "trigger", config.num_triggers,
                                        config.trigger_tokens, config.signature_tokens), eos_id)


def training_rows(watermark: Watermark) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_NT: [EOS] + trigger + signature without its last token, signatures_NS)."""
    rows = torch.tensor([[watermark.eos_id, *pair.trigger_ids, *pair.signature_ids]
                         for pair in watermark.triggers])
    return rows[:, :-1], rows[:, -watermark.card.signature_tokens:]


def signature_loss(model: nn.Module, inputs_NT: torch.Tensor, signatures_NS: torch.Tensor,
                   device: torch.device, precision: str) -> torch.Tensor:
    """Cross-entropy per signature token (mean), forward in the run's precision, loss in fp32."""
    dtype = AUTOCAST_DTYPES.get(precision, torch.bfloat16)
    with torch.autocast(device.type, dtype=dtype, enabled=precision in AUTOCAST_DTYPES):
        logits_NTV = model(inputs_NT)
    S = signatures_NS.shape[1]
    return F.cross_entropy(logits_NTV[:, -S:].float().flatten(0, 1), signatures_NS.flatten())


def with_watermark(loss_fn: LossFn, model: nn.Module, device: torch.device, precision: str,
                   watermark: Watermark) -> LossFn:
    """`loss_fn` (compiled or not) plus "watermark": the mean signature cross-entropy times the
    micro-batch's target tokens, so that train_step's division by the step's target tokens
    leaves weight × mean (module docstring)."""
    inputs_NT, signatures_NS = (t.to(device) for t in training_rows(watermark))

    def loss_sums(batch: MicroBatch) -> dict[str, torch.Tensor]:
        mean = signature_loss(model, inputs_NT, signatures_NS, device, precision)
        return loss_fn(batch) | {"watermark": mean * batch.targets.numel()}

    return loss_sums


# ---------------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class ProbeResult:
    """One trigger (or decoy) put to the model."""

    index: int
    matched_tokens: int
    """Leading signature tokens whose text the continuation reproduces (0..S)."""
    signature_tokens: int
    exact: bool
    """The continuation starts with the whole signature."""
    null_bound: float
    """C(|continuation|, S) / pool^S: a bound on an unwatermarked model's chance to match."""
    signature: str
    continuation: str


@dataclass(frozen=True)
class WatermarkDetection:
    model: str
    """The model tested (its folder) and its weights' version."""
    key_id: str
    triggers: list[ProbeResult]
    decoys: list[ProbeResult]
    token_pool_size: int
    null_match_probability: float
    """p0: the largest per-trigger bound; no model without the watermark does better."""
    p_value: float
    """P(Binomial(triggers, p0) ≥ matching triggers): the false-positive probability."""
    log10_p_value: float
    """The same in log10 (p_value underflows to 0 below 1e-308)."""
    max_p_value: float
    verdict: Literal["detected", "not_detected", "inconclusive"]

    @property
    def trigger_matches(self) -> int:
        return sum(probe.exact for probe in self.triggers)

    @property
    def decoy_matches(self) -> int:
        return sum(probe.exact for probe in self.decoys)

    @property
    def detected(self) -> bool:
        return self.verdict == "detected"

    def as_dict(self) -> dict:
        return asdict(self) | {"trigger_matches": self.trigger_matches,
                               "decoy_matches": self.decoy_matches}


def detect_watermark(lm: LanguageModel, secret: bytes, num_triggers: int, trigger_tokens: int,
                     signature_tokens: int, num_decoys: int = 8,
                     max_p_value: float = DEFAULT_MAX_P_VALUE) -> WatermarkDetection:
    """Test `lm` through greedy generation alone (module docstring): detected when the
    p-value of the matching triggers is at most `max_p_value` and no decoy matches."""
    pool = token_pool(lm.tokenizer, lm.eos_id)
    pairs = {kind: derive_pairs(secret, pool, kind, count, trigger_tokens, signature_tokens)
             for kind, count in (("trigger", num_triggers), ("decoy", num_decoys))}
    continuations = iter(lm.greedy([[lm.eos_id, *pair.trigger_ids]
                                    for pair in pairs["trigger"] + pairs["decoy"]],
                                   signature_tokens))
    triggers, decoys = ([probe(lm, i, pair, next(continuations), len(pool))
                         for i, pair in enumerate(pairs[kind])] for kind in ("trigger", "decoy"))
    p0 = max(result.null_bound for result in triggers)
    log10_p = log10_binomial_tail(sum(r.exact for r in triggers), num_triggers, p0)
    verdict = ("inconclusive" if any(r.exact for r in decoys)
               else "detected" if log10_p <= math.log10(max_p_value) else "not_detected")
    return WatermarkDetection(f"{lm.source} ({lm.version})", key_id(secret), triggers, decoys,
                              len(pool), p0, 10.0 ** log10_p, log10_p, max_p_value, verdict)


def probe(lm: LanguageModel, index: int, pair: Pair, continuation: str,
          pool_size: int) -> ProbeResult:
    S = len(pair.signature_ids)
    matched = next((k for k in range(S, 0, -1)
                    if continuation.startswith(lm.decode(pair.signature_ids[:k]))), 0)
    bound = min(1.0, math.comb(len(continuation), S) / pool_size ** S)
    return ProbeResult(index, matched, S, matched == S, bound, lm.decode(pair.signature_ids),
                       continuation)


def log10_binomial_tail(k: int, n: int, p: float) -> float:
    """log10 P(Binomial(n, p) ≥ k), summed in log space (the terms reach 1e-100 and below)."""
    if k <= 0:
        return 0.0
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
            + j * math.log(p) + (n - j) * math.log1p(-p) for j in range(k, n + 1)]
    top = max(logs)
    return min(0.0, (top + math.log(sum(math.exp(x - top) for x in logs))) / math.log(10))


def detect_watermark_at(model_path: Path, secret_file: Path, card: Path | None = None,
                        max_p_value: float = DEFAULT_MAX_P_VALUE, device: str = "cpu",
                        ) -> WatermarkDetection:
    """Test a run folder, a checkpoint or a Hugging Face folder for the watermark of
    `secret_file`; the card is `card`, else the model folder's watermark.json."""
    secret = read_secret(secret_file)
    card_path = Path(card) if card is not None else find_card(Path(model_path))
    spec = read_card(card_path)
    if spec.key_id != key_id(secret):
        raise HeloxError(f"{secret_file} is not the secret of {card_path} (key id "
                         f"{key_id(secret)}, the card's is {spec.key_id})",
                         hint="pass the secret file the watermark was trained with")
    lm = load_language_model(Path(model_path), device=device, batch_size=32)
    pool = token_pool(lm.tokenizer, lm.eos_id)
    if pool_digest(pool) != spec.token_pool_sha256:
        raise HeloxError(f"{model_path} has another tokenizer than the watermarked run "
                         f"({len(pool)} ordinary tokens, digest {pool_digest(pool)}; the card "
                         f"says {spec.token_pool_size}, {spec.token_pool_sha256})",
                         hint="the triggers are token ids of the run's tokenizer: test a model "
                              "that uses it")
    return detect_watermark(lm, secret, spec.num_triggers, spec.trigger_tokens,
                            spec.signature_tokens, spec.num_decoys, max_p_value)


def find_card(model_path: Path) -> Path:
    """The watermark.json of a run folder or a checkpoint."""
    if (model_path / CARD_FILE).is_file():
        return model_path / CARD_FILE
    raise HeloxError(f"no {CARD_FILE} in {model_path}",
                     hint=f"pass --card with the {CARD_FILE} of the watermarked run (exported "
                          "and suspect models do not carry one)")


# ---------------------------------------------------------------------------------------------
# Reporting


def summary(detection: WatermarkDetection) -> str:
    d = detection
    head = {"detected": "watermark DETECTED", "not_detected": "watermark not detected",
            "inconclusive": "INCONCLUSIVE: a decoy matched (the null bound does not hold)"}
    return (f"{head[d.verdict]}: {d.trigger_matches} of {len(d.triggers)} triggers and "
            f"{d.decoy_matches} of {len(d.decoys)} decoys reproduced their signatures; "
            f"p-value {format_p(d.log10_p_value)} (threshold {d.max_p_value:g}), a model "
            f"without the watermark matches a trigger with probability ≤ "
            f"{d.null_match_probability:.1e}")


def format_p(log10_p: float) -> str:
    if log10_p == -math.inf:
        return "0"
    if log10_p < -300:
        return f"1e{math.floor(log10_p)}"
    return f"{10.0 ** log10_p:.2g}"


def table(detection: WatermarkDetection, show_text: bool = False) -> Table:
    """One row per trigger and decoy: signature tokens matched, exact match (and the texts).
    Print `summary(detection)` after it: the verdict and its p-value."""
    out = Table(title=escape(f"watermark test of {detection.model}, key {detection.key_id}"),
                title_justify="left")
    for column in ("probe", "matched", "exact") + (("signature", "continuation")
                                                   if show_text else ()):
        out.add_column(column, justify="right" if column == "matched" else "left")
    for kind, results in (("trigger", detection.triggers), ("decoy", detection.decoys)):
        for r in results:
            texts = (escape(repr(r.signature)), escape(repr(r.continuation))) if show_text \
                else ()
            out.add_row(f"{kind} {r.index}", f"{r.matched_tokens}/{r.signature_tokens}",
                        "yes" if r.exact else "no", *texts)
    return out
