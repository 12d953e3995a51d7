"""The model under evaluation: a Helox checkpoint or a Hugging Face folder behind one interface.

Everything the harness asks of a model is one of three batched, deterministic requests:
- `loglikelihood`: log p(continuation | context) summed over the continuation's tokens, and
  whether greedy decoding would produce exactly that continuation (lm-eval's two outputs);
- `token_logprobs`: log p of every token of a text given the ones before it (perplexity,
  membership inference);
- `greedy`: greedy continuations of prompts, stopped at a stop string or a token budget.

Batches are padded on the right for scoring (a causal model's earlier positions never see the
padding) and on the left for generation (every row's next token is at the last column), with
the padding masked and positions counted from each row's first real token, so a batched
answer equals the unbatched one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from helox.checkpoint import load_trained_model, resolve_checkpoint
from helox.errors import HeloxError
from helox.fileio import sha256_file
from helox.model.generate import generate
from helox.model.llama import Llama

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(tokens_BT, position_ids_BT, real_BT: bool) -> logits_BTV: padding positions (real False)
are never attended to."""


@dataclass(frozen=True)
class LogLikelihood:
    logprob: float
    """Sum over the continuation's tokens of log p(token | everything before), nats."""
    greedy: bool
    """Every continuation token is the argmax at its position."""
    num_tokens: int


class LanguageModel:
    """A causal LM with its tokenizer; `version` names the weights (results are kept per
    version)."""

    def __init__(self, forward: Forward, tokenizer, eos_id: int, max_seq_len: int,
                 vocab_size: int, version: str, source: str, device: torch.device,
                 batch_size: int = 8, model: Llama | None = None):
        """`model`: a Helox model behind `forward`; greedy decoding then runs on its KV
        cache (one forward per new token) instead of re-reading the context."""
        self.forward, self.tokenizer = forward, tokenizer
        self.eos_id, self.max_seq_len, self.vocab_size = eos_id, max_seq_len, vocab_size
        self.version, self.source, self.device = version, source, device
        self.batch_size, self.model = batch_size, model

    # -- tokens ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The text's tokens alone: a tokenizer's own BOS/EOS template (an exported one adds
        the EOS first, a Llama one its BOS) is not applied; `document` places the EOS."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def document(self, text: str) -> list[int]:
        """A text read as the start of a document: EOS, then its tokens (as in training)."""
        return [self.eos_id, *self.encode(text)]

    # -- requests ----------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]
                      ) -> list[LogLikelihood]:
        """(context ids, continuation ids) pairs; a context too long is cut from the left."""
        results: list[LogLikelihood] = []
        for start in range(0, len(requests), self.batch_size):
            results += self._loglikelihood_batch(requests[start:start + self.batch_size])
        return results

    def _loglikelihood_batch(self, batch: Sequence[tuple[list[int], list[int]]]
                             ) -> list[LogLikelihood]:
        rows, spans = [], []
        for context, continuation in batch:
            if not continuation:
                raise HeloxError("an empty continuation has no likelihood",
                                 hint="give every choice or target at least one token")
            ids = (list(context) + list(continuation))[-(self.max_seq_len + 1):]
            rows.append(ids[:-1])  # inputs; the targets are ids[1:]
            spans.append((ids, len(continuation)))
        logprobs_BTV = self._right_padded_logprobs(rows)
        out = []
        for b, (ids, n) in enumerate(spans):
            targets = torch.tensor(ids[-n:], device=logprobs_BTV.device)
            positions = torch.arange(len(ids) - 1 - n, len(ids) - 1, device=logprobs_BTV.device)
            picked = logprobs_BTV[b, positions]
            out.append(LogLikelihood(float(picked.gather(-1, targets[:, None]).sum()),
                                     bool((picked.argmax(-1) == targets).all()), n))
        return out

    @torch.no_grad()
    def token_logprobs(self, texts_ids: Sequence[list[int]]) -> list[np.ndarray]:
        """log p(token t | tokens < t) for t = 1..len-1 of each id list (windows of
        max_seq_len + 1 tokens, each scored once, for longer lists)."""
        windows, owners = [], []
        for i, ids in enumerate(texts_ids):
            for start in range(0, max(len(ids) - 1, 1), self.max_seq_len):
                windows.append(ids[start:start + self.max_seq_len + 1])
                owners.append(i)
        pieces: list[list[np.ndarray]] = [[] for _ in texts_ids]
        for start in range(0, len(windows), self.batch_size):
            chunk = windows[start:start + self.batch_size]
            logprobs_BTV = self._right_padded_logprobs([w[:-1] for w in chunk])
            for b, window in enumerate(chunk):
                targets = torch.tensor(window[1:], device=logprobs_BTV.device)
                picked = logprobs_BTV[b, :len(targets)].gather(-1, targets[:, None])[:, 0]
                pieces[owners[start + b]].append(picked.double().cpu().numpy())
        return [np.concatenate(p) if p else np.zeros(0) for p in pieces]

    @torch.no_grad()
    def greedy(self, prompts: Sequence[list[int]], max_new_tokens: int,
               stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations (text) of each prompt, cut at the first stop string or EOS."""
        out: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            out += self._greedy_batch(prompts[start:start + self.batch_size], max_new_tokens,
                                      stop)
        return out

    def _greedy_batch(self, prompts: Sequence[list[int]], max_new_tokens: int,
                      stop: Sequence[str]) -> list[str]:
        if self.model is not None:
            return [_cut_at_stop(self._text(generate(
                self.model, list(p), max_new_tokens, 0.0, None, self.eos_id,
                should_stop=lambda new: any(s in self._text(new) for s in stop))), stop)
                for p in prompts]
        rows = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            next_ids = self._next_tokens([r[-self.max_seq_len:] for r in rows])
            for b, token in enumerate(next_ids):
                if done[b]:
                    continue
                if token == self.eos_id:
                    done[b] = True
                    continue
                rows[b].append(token)
                new[b].append(token)
                done[b] = any(s in self._text(new[b]) for s in stop)
            if all(done):
                break
        return [_cut_at_stop(self._text(ids), stop) for ids in new]

    def _text(self, ids: Sequence[int]) -> str:
        """Generated text with its special tokens (a turn's end token is a stop string)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # -- batching ----------------------------------------------------------------------------

    def _right_padded_logprobs(self, rows: Sequence[list[int]]) -> torch.Tensor:
        T = max(len(r) for r in rows)
        tokens = torch.full((len(rows), T), self.eos_id, dtype=torch.long)
        real = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, r in enumerate(rows):
            tokens[b, :len(r)] = torch.tensor(r)
            real[b, :len(r)] = True
        positions = torch.arange(T).expand(len(rows), T)
        logits_BTV = self.forward(tokens.to(self.device), positions.to(self.device),
                                  real.to(self.device))
        return logits_BTV.float().log_softmax(dim=-1)

    def _next_tokens(self, rows: Sequence[list[int]]) -> list[int]:
        T = max(len(r) for r in rows)
        tokens = torch.full((len(rows), T), self.eos_id, dtype=torch.long)
        real = torch.zeros(len(rows), T, dtype=torch.bool)
        positions = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, T - len(r):] = torch.tensor(r)
            real[b, T - len(r):] = True
            positions[b, T - len(r):] = torch.arange(len(r))
        logits_BTV = self.forward(tokens.to(self.device), positions.to(self.device),
                                  real.to(self.device))
        return logits_BTV[:, -1].float().argmax(-1).tolist()


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


# ---------------------------------------------------------------------------------------------
# Loading


def helox_forward(model) -> Forward:
    """Padding masked through the document mask: real tokens are document 1, padding 0 (a
    padding token then attends only to padding, and no real token attends to it)."""
    def forward(tokens_BT, position_ids_BT, real_BT):
        if bool(real_BT.all()):
            return model(tokens_BT, position_ids_BT)
        return model(tokens_BT, position_ids_BT, real_BT.long())
    return forward


def hf_forward(model) -> Forward:
    def forward(tokens_BT, position_ids_BT, real_BT):
        return model(input_ids=tokens_BT, attention_mask=real_BT.long(),
                     position_ids=position_ids_BT).logits
    return forward


def load_language_model(path: Path, ema: bool = False, device: str = "cpu",
                        batch_size: int = 8, warn: Callable[[str], None] = lambda m: None,
                        ) -> LanguageModel:
    """A run folder (its newest valid checkpoint), a checkpoint folder, or a Hugging Face
    folder (config.json + weights + tokenizer.json) that transformers loads offline."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return _load_hf(path, device, batch_size)
    if not path.exists():
        raise HeloxError(f"{path} does not exist", hint="pass a run folder, one of its "
                         "checkpoint folders, or a Hugging Face model folder")
    checkpoint = resolve_checkpoint(path, warn)
    trained = load_trained_model(checkpoint, ema=ema)
    model = trained.model.to(device)
    version = f"{checkpoint.name}{'-ema' if ema else ''}-{trained.weights_digest()}"
    return LanguageModel(helox_forward(model), trained.tokenizer, trained.eos_id,
                         model.cfg.max_seq_len, model.cfg.vocab_size, version, str(checkpoint),
                         torch.device(device), batch_size, model)


def _load_hf(path: Path, device: str, batch_size: int) -> LanguageModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / "tokenizer.json").is_file():
        raise HeloxError(f"{path}: no tokenizer.json", hint="export the model with its "
                         "tokenizer (helox export --format hf) or add a fast tokenizer file")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 torch_dtype=torch.float32).to(device).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    version = f"hf-{path.name}-{_file_digest(weights[0])}" if weights else f"hf-{path.name}"
    return LanguageModel(hf_forward(model), tokenizer, int(eos), config.max_position_embeddings,
                         config.vocab_size, version, str(path), torch.device(device),
                         batch_size)


def _file_digest(path: Path, chars: int = 12) -> str:
    """First hex digits of the file's sha256: two versions with one name stay apart."""
    return sha256_file(path)[:chars]
