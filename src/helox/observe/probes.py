"""Telemetry sampled every N steps: what the model does inside, measured on a fixed probe batch.

One extra no-grad forward of `probe_sequences` sequences every `sample_every_steps` steps, with
hooks that read the residual stream, the SwiGLU hidden units and each head's output, and that
materialise each layer's attention weights (SDPA does not return them) one sequence at a time.

Scalars of a `TelemetrySample` (l: layer index, h: query head index, d: probe domain):
| name                              | meaning                                                 |
|-----------------------------------|---------------------------------------------------------|
| attn_entropy.layer{l}.head{h}     | mean over probe queries of -sum p log p, nats (causal,  |
|                                   | document-masked when the probe carries documents)       |
| attn_entropy.layer{l}, attn_entropy | mean over the layer's heads, over all heads           |
| collapsed_heads.layer{l}, collapsed_heads | heads with entropy <= collapsed_head_entropy_nats |
| dead_heads.layer{l}, dead_heads   | heads whose output is <= dead_head_output_ratio of the  |
|                                   | layer's mean head output (L2 norm after o_proj)         |
| act_norm_mean.layer{l}, act_norm_max.layer{l} | per-token L2 norm of the block's output     |
| dead_neurons.layer{l}, dead_neurons | fraction of SwiGLU units dead over the window         |
| dead_neuron_count.layer{l}        | the same, as a count                                    |
| token_drift_js                    | JS divergence (nats, <= ln 2) of the tokens counted     |
|                                   | since the last sample against the data's unigram counts |
| token_drift_js_floor              | the JS of as many tokens drawn from the unigram         |
|                                   | distribution itself: what sampling noise alone gives    |
| token_drift_tokens                | how many tokens that window held                        |
| rare_token_mass                   | mean probability the model puts on the rare tokens      |
| rare_token_data_share             | their share of the training tokens                      |
| rare_token_mass_ratio             | mass / share (1: calibrated; -> 0: rare tokens collapse) |
| loss_p10, loss_p50, loss_p90, loss_p99, loss_mean | per-token loss on the probe, nats       |
| ppl, ppl.{d}                      | exp(mean loss), overall and per probe domain            |
Histograms: `act_norm.layer{l}` (per-token norms of the block output) and `token_loss`.

Legend for tensor suffixes: B probe sequences, T sequence, D d_model, H query heads, E head dim,
F SwiGLU hidden width, L layers, V vocabulary, N tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from pydantic import Field
from torch import nn

from helox.configbase import StrictModel
from helox.data.loader import MicroBatch, fixed_sequences, split_rows
from helox.data.shards import DatasetVersion
from helox.errors import HeloxError
from helox.model.config import ModelConfig
from helox.model.llama import Llama

LOSS_PERCENTILES = (10, 50, 90, 99)
"""Percentiles of the per-token probe loss reported as loss_p{q}."""
CHUNK_ELEMENTS = 1 << 24
"""The fp32 attention weights or log-probabilities held at once (64 MiB): the probe works
through its sequences in chunks of this size, whole batches at small shapes."""


class TelemetryConfig(StrictModel):
    sample_every_steps: int = Field(default=50, ge=0)
    """Take a sample after every this many optimizer steps; 0 turns sampled telemetry off."""
    probe_sequences: int = Field(default=4, ge=1)
    """Sequences in the fixed probe batch (shared evenly among the validation domains)."""
    histogram_bins: int = Field(default=32, ge=1)
    """Bins of the activation-norm and per-token-loss histograms."""
    dead_neuron_window_samples: int = Field(default=5, ge=1)
    """A SwiGLU unit is dead once it stayed inactive on this many samples in a row."""
    dead_neuron_activation_ratio: float = Field(default=1e-3, gt=0, lt=1)
    """A unit is inactive in a sample when its largest |activation| over the probe tokens is at
    most this fraction of its layer's mean |activation| (scale-free: SwiGLU is never exactly 0)."""
    dead_head_output_ratio: float = Field(default=0.05, gt=0, lt=1)
    """A head is dead when its mean output norm (after o_proj) is at most this fraction of the
    mean over its layer's heads."""
    collapsed_head_entropy_nats: float = Field(default=0.05, ge=0)
    """A head is collapsed when its mean attention entropy is at most this (one token)."""
    rare_token_quantile: float = Field(default=0.1, gt=0, le=1)
    """Rare tokens: this fraction (rounded up) of the tokens that occur in the training data,
    the least frequent ones (ties broken by lower token id first)."""

    def due(self, step: int) -> bool:
        """Whether to sample after `step` optimizer steps."""
        return self.sample_every_steps > 0 and step % self.sample_every_steps == 0


class Histogram(NamedTuple):
    bin_edges: np.ndarray
    """(bins + 1,) float64, increasing."""
    counts: np.ndarray
    """(bins,) int64."""

    def tensorboard_raw(self) -> dict:
        """Keyword arguments of SummaryWriter.add_histogram_raw; sum and sum of squares are
        taken at the bin centres (TensorBoard uses them only for the summary line)."""
        centres = (self.bin_edges[:-1] + self.bin_edges[1:]) / 2
        return {"min": float(self.bin_edges[0]), "max": float(self.bin_edges[-1]),
                "num": int(self.counts.sum()), "sum": float((centres * self.counts).sum()),
                "sum_squares": float((centres**2 * self.counts).sum()),
                "bucket_limits": self.bin_edges[1:].tolist(),
                "bucket_counts": self.counts.tolist()}


@dataclass
class TelemetrySample:
    step: int
    scalars: dict[str, float]
    """Flat metric names (module docstring) to values."""
    histograms: dict[str, Histogram]
    attention_entropy_LH: np.ndarray
    """Mean attention entropy (nats) per layer and head: one column of the dashboard heatmap."""


# ---------------------------------------------------------------------------------------------
# Token statistics


def unigram_counts(dataset: DatasetVersion, split: str = "train",
                   chunk_tokens: int = 1 << 24) -> np.ndarray:
    """Occurrences of every token id (dataset.vocab_size,) in the shards of `split`, streamed
    `chunk_tokens` at a time. The manifest keeps only their entropy, and adding the counts to
    it would change the dataset version id, so a run recounts them once at start."""
    counts_V = np.zeros(dataset.vocab_size, dtype=np.int64)
    for path in dataset.shard_paths(split):
        if path.stat().st_size == 0:
            continue
        tokens = np.memmap(path, dtype=dataset.dtype, mode="r")
        for start in range(0, len(tokens), chunk_tokens):
            chunk_counts = np.bincount(tokens[start:start + chunk_tokens])
            if len(chunk_counts) > len(counts_V):
                raise HeloxError(f"{path}: token id {len(chunk_counts) - 1} is outside the "
                                 f"tokenizer's {dataset.vocab_size} ids",
                                 hint="the shard is corrupt: run `helox data verify` and "
                                      "prepare the dataset again")
            counts_V[:len(chunk_counts)] += chunk_counts
    return counts_V


def js_divergence_nats(p_counts: np.ndarray, q_counts: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats (0 to ln 2) between two count vectors, normalised.

    No smoothing: the mixture M = (P + Q) / 2 is positive wherever P or Q is, so both KL terms
    are finite with zero counts (0 log 0 = 0). Additive smoothing would instead pull a sparse
    batch towards uniform and add divergence that is not in the data."""
    p_V = np.asarray(p_counts, dtype=np.float64)
    q_V = np.asarray(q_counts, dtype=np.float64)
    p_V, q_V = p_V / p_V.sum(), q_V / q_V.sum()
    m_V = (p_V + q_V) / 2
    return float(0.5 * _kl_to_mixture(p_V, m_V) + 0.5 * _kl_to_mixture(q_V, m_V))


def _kl_to_mixture(p_V: np.ndarray, m_V: np.ndarray) -> float:
    support = p_V > 0
    return float((p_V[support] * np.log(p_V[support] / m_V[support])).sum())


def rare_token_ids(counts_V: np.ndarray, quantile: float) -> np.ndarray:
    """The ceil(quantile * n) least frequent of the n token ids that occur (count > 0), ties
    broken by lower id first: a definition that does not depend on where a count threshold
    falls among tied tokens."""
    seen = np.flatnonzero(counts_V > 0)
    if len(seen) == 0:
        raise HeloxError("the unigram counts are all zero: no training tokens to define rare "
                         "tokens by", hint="pass unigram_counts(dataset) of a non-empty split")
    order = seen[np.argsort(counts_V[seen], kind="stable")]
    return np.sort(order[:math.ceil(quantile * len(seen))])


# ---------------------------------------------------------------------------------------------
# The probe forward


@dataclass
class _LayerRecord:
    """What the hooks keep of one block, on the model's device, reduced as they go."""

    act_norms_N: torch.Tensor | None = None
    unit_max_F: torch.Tensor | None = None
    unit_mean: torch.Tensor | None = None
    head_out_H: torch.Tensor | None = None
    entropy_H: torch.Tensor | None = None


@dataclass
class _Recorder:
    """Registers the probe hooks on a Llama and removes them on exit, whatever happened."""

    model: Llama
    layers: list[_LayerRecord] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def __enter__(self) -> _Recorder:
        for block in self.model.blocks:
            record = _LayerRecord()
            self.layers.append(record)
            self.handles += [
                block.register_forward_hook(_block_output_hook(record)),
                block.mlp.down_proj.register_forward_pre_hook(_hidden_units_hook(record)),
                block.attn.o_proj.register_forward_pre_hook(
                    _head_output_hook(record, block.attn.num_heads)),
                block.attn.register_forward_hook(_entropy_hook(record), with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _block_output_hook(record: _LayerRecord):
    def hook(module: nn.Module, args: tuple, x_BTD: torch.Tensor) -> None:
        record.act_norms_N = x_BTD.float().norm(dim=-1).flatten()
    return hook


def _hidden_units_hook(record: _LayerRecord):
    """The input of down_proj is silu(gate) * up: the SwiGLU hidden units."""
    def hook(module: nn.Module, args: tuple) -> None:
        abs_BTF = args[0].float().abs()
        record.unit_max_F, record.unit_mean = abs_BTF.amax(dim=(0, 1)), abs_BTF.mean()
    return hook


def _head_output_hook(record: _LayerRecord, num_heads: int):
    """Mean L2 norm of what each head writes to the residual stream, W_o[:, h] @ y_h, via the
    (E, E) Gram matrix of each head's W_o slice: no (B, T, H, D) tensor is formed."""
    def hook(module: nn.Linear, args: tuple) -> None:
        y_BTHE = args[0].float().unflatten(-1, (num_heads, -1))
        # A LoRA-adapted o_proj writes with its base weight plus the active adapters' deltas.
        weight = module.weight if isinstance(module, nn.Linear) else module.effective_weight()
        w_DHE = weight.float().unflatten(-1, (num_heads, -1))
        gram_HEE = torch.einsum("dhe,dhf->hef", w_DHE, w_DHE)
        sq_norm_BTH = (torch.einsum("bthe,hef->bthf", y_BTHE, gram_HEE) * y_BTHE).sum(-1)
        record.head_out_H = sq_norm_BTH.clamp_min(0).sqrt().mean(dim=(0, 1))
    return hook


def _entropy_hook(record: _LayerRecord):
    """Mean attention entropy per head, over chunks of sequences of at most CHUNK_ELEMENTS
    attention weights (at least one sequence: H * T^2)."""
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        x_BTD, cos_TE, sin_TE = args[:3]
        mask_B1TT = args[3] if len(args) > 3 else kwargs.get("mask_B1TT")
        B, T, _ = x_BTD.shape
        total_H = torch.zeros(module.num_heads, device=x_BTD.device)
        for rows in _chunks(B, module.num_heads * T * T):
            probs_bHTT = module.attention_probs(
                x_BTD[rows], _rows(cos_TE, rows), _rows(sin_TE, rows), _rows(mask_B1TT, rows))
            total_H -= torch.special.xlogy(probs_bHTT, probs_bHTT).sum(-1).sum(dim=(0, 2))
        record.entropy_H = total_H / (B * T)
    return hook


def _chunks(num_rows: int, row_elements: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // row_elements)
    return [slice(i, i + step) for i in range(0, num_rows, step)]


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """Rows of a per-sequence (B, ...) tensor; shared (T, E) RoPE tables pass unchanged."""
    return t[rows] if t is not None and t.dim() == 4 else t


# ---------------------------------------------------------------------------------------------
# Telemetry


class Telemetry:
    """Sampled telemetry of one run: the rare-token set and unigram baseline fixed at start,
    the dead-neuron streaks and the token counts of the current window as state."""

    def __init__(self, config: TelemetryConfig, model_config: ModelConfig,
                 unigram_counts: np.ndarray):
        vocab_size = model_config.vocab_size
        if vocab_size is None or len(unigram_counts) > vocab_size:
            raise HeloxError(f"unigram counts cover {len(unigram_counts)} token ids, the model "
                             f"{vocab_size}", hint="resolve model.vocab_size from the dataset "
                                                   "(resolve_vocab_size) before telemetry")
        self.config, self.model_config = config, model_config
        self.baseline_counts_V = np.zeros(vocab_size, dtype=np.int64)
        self.baseline_counts_V[:len(unigram_counts)] = unigram_counts
        self.rare_ids = torch.from_numpy(rare_token_ids(self.baseline_counts_V,
                                                        config.rare_token_quantile))
        self.rare_data_share = float(self.baseline_counts_V[self.rare_ids.numpy()].sum()
                                     / self.baseline_counts_V.sum())
        self.inactive_samples_LF = torch.zeros(model_config.num_layers, model_config.ffn_dim,
                                               dtype=torch.int64)
        """Samples in a row each SwiGLU unit has been inactive."""
        self.window_counts_V: torch.Tensor | None = None
        """Tokens counted since the last sample, on the device they came from."""
        self._js_floor: dict[int, float] = {}

    def count_tokens(self, tokens: torch.Tensor) -> None:
        """Add a training batch's token ids to the drift window. Call it every step: a window
        of 50 batches has a sampling-noise floor ~15x lower than one batch (8K vocabulary,
        2K-token batches: 0.012 vs 0.19 nats). An index_add, so no host sync on CUDA."""
        tokens_N = tokens.flatten()
        if self.window_counts_V is None:
            self.window_counts_V = torch.zeros(len(self.baseline_counts_V), dtype=torch.int64)
        self.window_counts_V = self.window_counts_V.to(tokens_N.device)  # once: CPU after a load
        self.window_counts_V.index_add_(0, tokens_N, torch.ones_like(tokens_N, dtype=torch.int64))

    def sample(self, step: int, model: nn.Module, probe: MicroBatch | Mapping[str, MicroBatch],
               train_tokens: torch.Tensor | None = None) -> TelemetrySample:
        """Measure `model` on the probe batch (one MicroBatch, or one per domain: adds ppl.{d})
        and the drift of the tokens counted since the last sample plus `train_tokens`; then
        start a new drift window. Runs in eval mode without grad, restores each module's mode,
        and leaves no hook behind. Under autocast the forward runs in its precision; every
        statistic is reduced in fp32."""
        if train_tokens is not None:
            self.count_tokens(train_tokens)
        llama = _unwrap(model)
        batch, domain_rows = _join(probe, next(llama.parameters()).device)
        modes = {module: module.training for module in llama.modules()}
        llama.eval()
        try:
            with torch.no_grad():
                layers, losses_BT, rare_mass = self._probe_forward(llama, batch)
        finally:
            for module, mode in modes.items():
                module.training = mode
        scalars: dict[str, float] = {}
        histograms: dict[str, Histogram] = {}
        entropy_LH = self._attention_scalars(layers, scalars)
        self._activation_scalars(layers, scalars, histograms)
        self._neuron_scalars(layers, scalars)
        self._loss_scalars(losses_BT.cpu().numpy(), domain_rows, scalars, histograms)
        self._rare_scalars(rare_mass, scalars)
        self._drift_scalars(scalars)
        return TelemetrySample(step, scalars, histograms, entropy_LH)

    def _probe_forward(self, llama: Llama, batch: MicroBatch,
                       ) -> tuple[list[_LayerRecord], torch.Tensor, float]:
        """(hook records, per-token losses (B, T), mean rare-token probability)."""
        with _Recorder(llama) as recorder:
            logits_BTV = llama(batch.inputs, batch.position_ids, batch.doc_ids)
        rare_ids = self.rare_ids.to(logits_BTV.device)
        B, T, V = logits_BTV.shape
        losses, rare_masses = [], []
        for rows in _chunks(B, T * V):  # bounded fp32 copies of the logits
            logp_bTV = logits_BTV[rows].float().log_softmax(dim=-1)
            targets_bT = batch.targets[rows]
            loss_bT = -logp_bTV.gather(-1, targets_bT.clamp(min=0)[..., None]).squeeze(-1)
            # untrained chat targets (IGNORE_INDEX) are left out of the loss statistics
            losses.append(loss_bT.masked_fill(targets_bT < 0, float("nan")))
            rare_masses.append(logp_bTV[..., rare_ids].logsumexp(dim=-1).exp())
        return recorder.layers, torch.cat(losses), torch.cat(rare_masses).mean().item()

    def _attention_scalars(self, layers: list[_LayerRecord], scalars: dict) -> np.ndarray:
        cfg = self.config
        entropy_LH = torch.stack([r.entropy_H for r in layers]).cpu().numpy().astype(np.float64)
        head_out_LH = torch.stack([r.head_out_H for r in layers]).cpu().numpy()
        dead_LH = head_out_LH <= cfg.dead_head_output_ratio * head_out_LH.mean(1, keepdims=True)
        collapsed_LH = entropy_LH <= cfg.collapsed_head_entropy_nats
        for layer, entropy_H in enumerate(entropy_LH):
            name = f"layer{layer}"
            scalars.update({f"attn_entropy.{name}.head{h}": float(e)
                            for h, e in enumerate(entropy_H)})
            scalars[f"attn_entropy.{name}"] = float(entropy_H.mean())
            scalars[f"collapsed_heads.{name}"] = float(collapsed_LH[layer].sum())
            scalars[f"dead_heads.{name}"] = float(dead_LH[layer].sum())
        scalars["attn_entropy"] = float(entropy_LH.mean())
        scalars["collapsed_heads"] = float(collapsed_LH.sum())
        scalars["dead_heads"] = float(dead_LH.sum())
        return entropy_LH

    def _activation_scalars(self, layers: list[_LayerRecord], scalars: dict,
                            histograms: dict) -> None:
        for layer, record in enumerate(layers):
            norms_N = record.act_norms_N.cpu().numpy().astype(np.float64)
            scalars[f"act_norm_mean.layer{layer}"] = float(norms_N.mean())
            scalars[f"act_norm_max.layer{layer}"] = float(norms_N.max())
            histograms[f"act_norm.layer{layer}"] = _histogram(norms_N, self.config.histogram_bins)

    def _neuron_scalars(self, layers: list[_LayerRecord], scalars: dict) -> None:
        """Advance each unit's inactive streak (reset by any activity) and count the dead."""
        unit_max_LF = torch.stack([r.unit_max_F for r in layers]).cpu()
        unit_mean_L1 = torch.stack([r.unit_mean for r in layers]).cpu()[:, None]
        inactive_LF = unit_max_LF <= self.config.dead_neuron_activation_ratio * unit_mean_L1
        self.inactive_samples_LF = torch.where(inactive_LF, self.inactive_samples_LF + 1, 0)
        dead_LF = self.inactive_samples_LF >= self.config.dead_neuron_window_samples
        for layer, dead_F in enumerate(dead_LF):
            scalars[f"dead_neurons.layer{layer}"] = float(dead_F.float().mean())
            scalars[f"dead_neuron_count.layer{layer}"] = float(dead_F.sum())
        scalars["dead_neurons"] = float(dead_LF.float().mean())

    def _loss_scalars(self, losses_BT: np.ndarray, domain_rows: dict[str, slice],
                      scalars: dict, histograms: dict) -> None:
        losses_N = losses_BT.astype(np.float64).ravel()
        losses_N = losses_N[~np.isnan(losses_N)]  # NaN: an untrained chat target
        if not len(losses_N):
            return
        for q, value in zip(LOSS_PERCENTILES, np.percentile(losses_N, LOSS_PERCENTILES)):
            scalars[f"loss_p{q}"] = float(value)
        scalars["loss_mean"] = float(losses_N.mean())
        scalars["ppl"] = math.exp(scalars["loss_mean"])
        for domain, rows in domain_rows.items():
            domain_losses = losses_BT[rows].astype(np.float64)
            if not np.isnan(domain_losses).all():
                scalars[f"ppl.{domain}"] = math.exp(float(np.nanmean(domain_losses)))
        histograms["token_loss"] = _histogram(losses_N, self.config.histogram_bins)

    def _rare_scalars(self, rare_mass: float, scalars: dict) -> None:
        scalars["rare_token_mass"] = rare_mass
        scalars["rare_token_data_share"] = self.rare_data_share
        scalars["rare_token_mass_ratio"] = rare_mass / self.rare_data_share

    def _drift_scalars(self, scalars: dict) -> None:
        """JS of the window's tokens against the baseline, then a new window. No tokens
        counted: no drift scalars (a metric that cannot be measured is absent, not 0)."""
        if self.window_counts_V is None or int(self.window_counts_V.sum()) == 0:
            return
        counts_V = self.window_counts_V.cpu().numpy().copy()  # .cpu() of a CPU tensor is itself
        self.window_counts_V.zero_()
        num_tokens = int(counts_V.sum())
        scalars["token_drift_js"] = js_divergence_nats(counts_V, self.baseline_counts_V)
        scalars["token_drift_js_floor"] = self.js_floor(num_tokens)
        scalars["token_drift_tokens"] = float(num_tokens)

    def js_floor(self, num_tokens: int) -> float:
        """JS divergence of `num_tokens` tokens drawn from the baseline itself (fixed seed,
        cached per size): the divergence of an in-distribution window from sampling alone,
        which grows as the window shrinks against the vocabulary."""
        if num_tokens not in self._js_floor:
            probs_V = self.baseline_counts_V / self.baseline_counts_V.sum()
            drawn_V = np.random.default_rng(0).multinomial(num_tokens, probs_V)
            self._js_floor[num_tokens] = js_divergence_nats(drawn_V, self.baseline_counts_V)
        return self._js_floor[num_tokens]

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the dead-neuron streaks and the drift window's counts."""
        window_V = (torch.zeros(len(self.baseline_counts_V), dtype=torch.int64)
                    if self.window_counts_V is None else self.window_counts_V.cpu().clone())
        return {"inactive_samples_LF": self.inactive_samples_LF.clone(),
                "window_counts_V": window_V}

    def load_state_dict(self, state: dict) -> None:
        inactive_LF, window_V = state["inactive_samples_LF"], state["window_counts_V"]
        if (inactive_LF.shape != self.inactive_samples_LF.shape
                or window_V.shape != (len(self.baseline_counts_V),)):
            raise HeloxError(f"telemetry state of a model with {tuple(inactive_LF.shape)} "
                             f"(layers, SwiGLU units) and {window_V.shape[0]} tokens, this model "
                             f"has {tuple(self.inactive_samples_LF.shape)} and "
                             f"{len(self.baseline_counts_V)}",
                             hint="resume from a checkpoint of the same model shape")
        self.inactive_samples_LF = inactive_LF.clone().to(torch.int64)
        self.window_counts_V = window_V.clone().to(torch.int64)


def _histogram(values_N: np.ndarray, bins: int) -> Histogram:
    counts, edges = np.histogram(values_N, bins=bins)
    return Histogram(edges, counts.astype(np.int64))


def _unwrap(model: nn.Module) -> Llama:
    """The Llama inside torch.compile's or DDP's wrapper: hooks go on the eager module, so a
    compiled graph never sees them."""
    while not isinstance(model, Llama):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise HeloxError(f"telemetry probes a helox Llama, got {type(model).__name__}",
                             hint="pass the model the loop trains (or its compiled wrapper)")
        model = inner
    return model


def _join(probe: MicroBatch | Mapping[str, MicroBatch], device: torch.device,
          ) -> tuple[MicroBatch, dict[str, slice]]:
    """One batch on `device` from one MicroBatch or one per domain, and each domain's rows."""
    if isinstance(probe, MicroBatch):
        return MicroBatch(*(None if t is None else t.to(device) for t in probe)), {}
    names, rows, start = list(probe), {}, 0
    for name in names:
        rows[name] = slice(start, start + probe[name].inputs.shape[0])
        start = rows[name].stop
    fields = [None if probe[names[0]][i] is None
              else torch.cat([probe[n][i] for n in names]).to(device)
              for i in range(len(MicroBatch._fields))]
    return MicroBatch(*fields), rows


def probe_batches(dataset: DatasetVersion, config: TelemetryConfig, seq_len: int,
                  document_masking: bool) -> dict[str, MicroBatch]:
    """The fixed probe batch: the first sequences of the validation split (training split if
    there is none), `config.probe_sequences` in all, shared evenly among its domains (the
    first domains take the remainder). Read once at start; the same sequences every sample."""
    split = "val" if "val" in dataset.splits() else "train"
    domains = dataset.domains(split)
    per_domain, extra = divmod(config.probe_sequences, max(1, len(domains)))
    batches = fixed_sequences(dataset, split, seq_len, per_domain + (extra > 0), document_masking)
    shares = {d: per_domain + (i < extra) for i, d in enumerate(domains)}
    return {d: split_rows(data, shares[d])[0] for d, data in batches.items() if shares[d] > 0}
