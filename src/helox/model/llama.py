"""Llama-style decoder: RMSNorm, rotary position embeddings, SwiGLU, grouped-query attention.

Single-device model code; parallelism and precision policies are applied from outside.
RoPE uses the rotate-half layout of Hugging Face's Llama, so weights convert by renaming only.

Legend for tensor suffixes: B batch, T sequence, D d_model, H query heads, K key/value heads,
E head dim, F SwiGLU hidden width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from helox.model.config import ModelConfig
from helox.errors import HeloxError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares loses precision in bf16.
        normed_BTD = F.rms_norm(x_BTD.float(), (x_BTD.shape[-1],), eps=self.eps)
        return self.weight * normed_BTD.type_as(x_BTD)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), halves repeated (rotate-half layout), fp32."""
    inv_freq_E2 = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_TE2 = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq_E2)
    angles_TE = torch.cat([angles_TE2, angles_TE2], dim=-1)
    return angles_TE.cos(), angles_TE.sin()


def apply_rope(x_BHTE: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor) -> torch.Tensor:
    """Rotate in x's dtype (as transformers does): fp32 tables would promote bf16 activations.

    x·cos + rotate_half(x)·sin, written half by half (x1·cos − x2·sin, x2·cos + x1·sin): the
    same products and sums, bit for bit, as transformers' `cat([-x2, x1])` form, which
    torch.compile (2.13, CPU, bf16) differentiates into NaN key gradients when the rotated
    keys feed `math_attention` (tests/training/test_precision.py holds the case)."""
    half = x_BHTE.shape[-1] // 2
    cos_TE, sin_TE = cos_TE.to(x_BHTE.dtype), sin_TE.to(x_BHTE.dtype)
    x1, x2 = x_BHTE[..., :half], x_BHTE[..., half:]
    return torch.cat([x1 * cos_TE[..., :half] - x2 * sin_TE[..., :half],
                      x2 * cos_TE[..., half:] + x1 * sin_TE[..., half:]], dim=-1)


ATTENTION_KERNELS = ("sdpa", "math")
"""How attention is computed: PyTorch's fused `scaled_dot_product_attention` (FlashAttention and
memory-efficient kernels on CUDA, a flash kernel on CPU), or `math_attention` (two batched
matmuls and a softmax, which torch.compile fuses, and whose 16-bit matmuls run on AMX)."""


def math_attention(q_BHTE: torch.Tensor, k_BHSE: torch.Tensor, v_BHSE: torch.Tensor,
                   bias_B1TS: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √E + bias) v, spelled out: SDPA's function, with the mask as an additive
    fp32 `bias` (0 = attend, fp32's lowest value = masked; `additive_mask`). It materialises the
    (B, H, T, S) scores, so it is for the shapes where that is cheap (a training context of a
    few hundred tokens); under autocast the matmuls run in 16 bits and the softmax in fp32.

    An additive bias rather than a boolean `masked_fill`, which inductor evaluates with 64-bit
    vector compares per score in the forward and again in the backward: on a 2-core Xeon with
    AMX, compiled bf16 forward + backward of (8, 6, 256, 64) causal attention took 5.1 ms
    against 8.1 ms, and a compiled training step of the reference shape 1/1.07 of the time."""
    scores_BHTS = (q_BHTE @ k_BHSE.transpose(-2, -1)) * (1.0 / math.sqrt(q_BHTE.shape[-1]))
    return (scores_BHTS + bias_B1TS).softmax(dim=-1).to(v_BHSE.dtype) @ v_BHSE


def additive_mask(mask_B1TS: torch.Tensor | None, T: int, S: int,
                  device: torch.device) -> torch.Tensor:
    """The fp32 bias `math_attention` adds to its scores for a boolean mask (True = attend), or,
    without one, causal over the last T of S keys: 0 where a query attends, fp32's lowest
    value where it does not (finite, so that a row with no key left stays finite, as SDPA's)."""
    if mask_B1TS is None:
        mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)
    lowest = torch.finfo(torch.float32).min
    return torch.zeros(mask_B1TS.shape, device=device).masked_fill(~mask_B1TS, lowest)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kernel = "sdpa"
        """One of ATTENTION_KERNELS (`Llama.set_attention`)."""
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor,
                mask_B1TT: torch.Tensor | None = None,
                cache: LayerCache | DecodeLayerCache | None = None):
        """cos/sin are (T, E), or (B, 1, T, E) with per-sequence positions; mask_B1TT, SDPA's
        `attn_mask` (boolean, True = attend, or an additive float bias), replaces the causal
        mask when given. With a `cache`, x holds the tokens after
        the cached ones: their keys and values are added to it and they attend to all (a
        `DecodeLayerCache`: one token per row, at the row's position, under its row's mask)."""
        B, T, _ = x_BTD.shape
        if cache is None:
            q_BHTE, k_BHTE, v_BHTE = self.heads(x_BTD, cos_TE, sin_TE)
            causal = mask_B1TT is None
        else:
            q_BHTE, k_BKTE, v_BKTE = self.rotated(x_BTD, cos_TE, sin_TE)
            k_BHTE, v_BHTE = self.expand(*cache.append(k_BKTE, v_BKTE))
            mask_B1TT, causal = cache.mask(T, x_BTD.device)
        if self.kernel == "math":
            if mask_B1TT is None or not mask_B1TT.is_floating_point():
                mask_B1TT = additive_mask(mask_B1TT, T, k_BHTE.shape[2], x_BTD.device)
            y_BHTE = math_attention(q_BHTE, k_BHTE, v_BHTE, mask_B1TT)
        else:
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, k_BHTE, v_BHTE,
                                                    attn_mask=mask_B1TT, is_causal=causal)
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))

    def heads(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries and keys and the values, K/V repeated to one per query head: what
        the forward feeds SDPA, shared with `attention_probs` so both see the same scores."""
        q_BHTE, k_BKTE, v_BKTE = self.rotated(x_BTD, cos_TE, sin_TE)
        return (q_BHTE, *self.expand(k_BKTE, v_BKTE))

    def rotated(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries (B, H, T, E) and keys and the values (B, K, T, E)."""
        B, T, _ = x_BTD.shape
        q_BHTE = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q_BHTE, cos_TE, sin_TE), apply_rope(k_BKTE, cos_TE, sin_TE), v_BKTE

    def expand(self, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V repeated to one per query head (grouped-query attention)."""
        if self.num_kv_heads == self.num_heads:
            return k_BKTE, v_BKTE
        # Expanding K/V keeps SDPA on its fused kernels, which GQA mode can leave on CPU.
        repeats = self.num_heads // self.num_kv_heads
        return k_BKTE.repeat_interleave(repeats, dim=1), v_BKTE.repeat_interleave(repeats, dim=1)


    def attention_probs(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor,
                        mask_B1TT: torch.Tensor | None = None) -> torch.Tensor:
        """The attention weights (B, H, T, T) in fp32 that the forward's SDPA applies and does
        not return: for telemetry and explanations, not training (it holds H * T^2 floats per
        sequence). Takes the forward's arguments (the mask boolean or additive); masked
        entries are exactly 0."""
        q_BHTE, k_BHTE, _ = self.heads(x_BTD, cos_TE, sin_TE)
        T = q_BHTE.shape[2]
        scores_BHTT = q_BHTE.float() @ k_BHTE.float().transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask_B1TT is None:
            mask_B1TT = torch.ones(T, T, dtype=torch.bool, device=scores_BHTT.device).tril()
        if mask_B1TT.is_floating_point():  # math attention's additive form: exp() of it is 0
            return (scores_BHTT + mask_B1TT).softmax(dim=-1)
        return scores_BHTT.masked_fill(~mask_B1TT, float("-inf")).softmax(dim=-1)

class LayerCache:
    """One layer's slice of a `KVCache`."""

    def __init__(self, cache: KVCache, layer: int):
        self.cache, self.layer = cache, layer

    def append(self, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values; return every cached one (B, K, L + T, E)."""
        c, start = self.cache, self.cache.length
        end = start + k_BKTE.shape[2]
        c.k_LBKTE[self.layer, :, :, start:end] = k_BKTE
        c.v_LBKTE[self.layer, :, :, start:end] = v_BKTE
        return c.k_LBKTE[self.layer, :, :, :end], c.v_LBKTE[self.layer, :, :, :end]

    def mask(self, T: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attention mask, is_causal) for T new tokens after the cached ones."""
        start = self.cache.length
        if T == 1:
            return None, False  # one new token sees everything before it
        if start == 0:
            return None, True
        keys = torch.arange(start + T, device=device)
        return keys[None, :] <= (start + torch.arange(T, device=device))[:, None], False


class KVCache:
    """Keys and values of the tokens a model has seen, per layer, so that each new token is
    one forward of one token (incremental decoding) instead of the whole context again.
    Preallocated for `max_tokens`; `length` tokens are filled. A plain tensor cache, as
    transformers' StaticCache, written here because Helox's Llama is its own module."""

    def __init__(self, cfg: ModelConfig, batch: int, max_tokens: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (cfg.num_layers, batch, cfg.kv_heads, max_tokens, cfg.head_dim)
        self.k_LBKTE = torch.empty(shape, device=device, dtype=dtype)
        self.v_LBKTE = torch.empty(shape, device=device, dtype=dtype)
        self.max_tokens, self.length = max_tokens, 0

    @classmethod
    def over(cls, k_LBKTE: torch.Tensor, v_LBKTE: torch.Tensor) -> KVCache:
        """An empty cache that writes into existing storage: some rows of a `BatchKVCache`,
        so that a prompt is prefilled in place by the ordinary cached forward."""
        cache = cls.__new__(cls)
        cache.k_LBKTE, cache.v_LBKTE = k_LBKTE, v_LBKTE
        cache.max_tokens, cache.length = k_LBKTE.shape[3], 0
        return cache

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self, index)


class BatchKVCache:
    """The keys and values of up to `max_rows` independent sequences, each at its own length
    (a server's continuous batch): one preallocated (L, B, K, T, E) pair, rows 0..n-1 in use,
    `lengths[row]` tokens filled in each. A row is prefilled through `rows()` and then grows
    one token per `Llama.decode`, which masks every key past a row's length, so a freed row
    is reused without clearing. Zero-filled: masked keys and values must be finite, as SDPA
    adds the mask to q·k and multiplies the values by the (zero) weights (0 · NaN is NaN)."""

    def __init__(self, cfg: ModelConfig, max_rows: int, max_tokens: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (cfg.num_layers, max_rows, cfg.kv_heads, max_tokens, cfg.head_dim)
        self.k_LBKTE = torch.zeros(shape, device=device, dtype=dtype)
        self.v_LBKTE = torch.zeros(shape, device=device, dtype=dtype)
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.lengths = [0] * max_rows

    def rows(self, start: int, count: int) -> KVCache:
        """Rows start..start+count-1 as an empty `KVCache` (a view): prefill them with
        `model(tokens, cache=...)`, then `set_length` each."""
        return KVCache.over(self.k_LBKTE[:, start:start + count],
                            self.v_LBKTE[:, start:start + count])

    def set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source`'s filled keys and values (and length) to row `target`: how a
        server keeps its active rows at 0..n-1 when one in the middle finishes."""
        end = self.lengths[source]
        self.k_LBKTE[:, target, :, :end] = self.k_LBKTE[:, source, :, :end]
        self.v_LBKTE[:, target, :, :end] = self.v_LBKTE[:, source, :, :end]
        self.lengths[target] = end


class DecodeLayerCache:
    """One layer's view of a `BatchKVCache` during `Llama.decode` of its first B rows: each
    row's new key and value go at that row's own position."""

    def __init__(self, cache: BatchKVCache, layer: int, positions_B: torch.Tensor,
                 mask_B11T: torch.Tensor):
        self.cache, self.layer = cache, layer
        self.positions_B, self.mask_B11T = positions_B, mask_B11T

    def append(self, k_BK1E: torch.Tensor, v_BK1E: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new key and value; return keys and values (B, K, T, E) up to the
        longest row (what is past a shorter row's length is masked)."""
        B, num_keys = k_BK1E.shape[0], self.mask_B11T.shape[-1]
        rows_B = torch.arange(B, device=k_BK1E.device)
        k_BKTE = self.cache.k_LBKTE[self.layer, :B]
        v_BKTE = self.cache.v_LBKTE[self.layer, :B]
        k_BKTE[rows_B, :, self.positions_B] = k_BK1E[:, :, 0]
        v_BKTE[rows_B, :, self.positions_B] = v_BK1E[:, :, 0]
        return k_BKTE[:, :, :num_keys], v_BKTE[:, :, :num_keys]

    def mask(self, T: int, device: torch.device) -> tuple[torch.Tensor, bool]:
        return self.mask_B11T, False


def document_mask(doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean: query i may attend key j when j <= i and both are in one document."""
    T = doc_ids_BT.shape[1]
    same_doc_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    return (same_doc_BTT & causal_TT)[:, None]


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x_BTD: torch.Tensor, cos_TE: torch.Tensor, sin_TE: torch.Tensor,
                mask_B1TT: torch.Tensor | None = None,
                cache: LayerCache | DecodeLayerCache | None = None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TE, sin_TE, mask_B1TT, cache)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos_TE, sin_TE = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos_TE, persistent=False)
        self.register_buffer("rope_sin", sin_TE, persistent=False)
        self.register_buffer("causal_bias", None, persistent=False)
        """Math attention's causal `additive_mask` (max_seq_len, max_seq_len), read rather than
        recomputed by every block (`set_attention`)."""
        self.checkpointed_blocks: frozenset[int] = frozenset()
        """Blocks whose activations are recomputed in the backward (training with grad only)."""
        self.reset_parameters()

    def set_attention(self, kernel: str) -> None:
        """Compute every block's attention with `kernel` (one of ATTENTION_KERNELS); the same
        function either way, up to rounding."""
        if kernel not in ATTENTION_KERNELS:
            raise HeloxError(f"unknown attention kernel {kernel!r}",
                             hint=f"choose one of {', '.join(ATTENTION_KERNELS)}")
        length = self.cfg.max_seq_len
        self.causal_bias = additive_mask(None, length, length, self.rope_cos.device) \
            if kernel == "math" else None
        for block in self.blocks:
            block.attn.kernel = kernel

    def set_activation_checkpointing(self, blocks: bool | list[int]) -> None:
        """Recompute the activations of these blocks (True: all) in the backward instead of
        keeping them: only each block's input stays saved, for ~1/3 more compute."""
        num_blocks = len(self.blocks)
        if isinstance(blocks, bool):
            self.checkpointed_blocks = frozenset(range(num_blocks) if blocks else ())
            return
        bad = [i for i in blocks if not 0 <= i < num_blocks]
        if bad:
            raise HeloxError(f"activation checkpointing names block(s) {bad}, but the model has "
                             f"{num_blocks} blocks: indices 0..{num_blocks - 1}",
                             hint=f"set train.activation_checkpointing to true, false or a list "
                                  f"of indices in 0..{num_blocks - 1}")
        self.checkpointed_blocks = frozenset(blocks)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; projections into the residual stream scaled by
        1/sqrt(2 * num_layers) so its variance does not grow with depth (GPT-2)."""
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, std=std / math.sqrt(2 * self.cfg.num_layers))
            else:
                nn.init.normal_(param, std=std)

    def forward(self, tokens_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                doc_ids_BT: torch.Tensor | None = None, cache: KVCache | None = None,
                ) -> torch.Tensor:
        """Next-token logits (B, T, V) for a batch of token ids (B, T).

        Packed documents: `position_ids_BT` restarts RoPE positions per document and
        `doc_ids_BT` limits attention to earlier tokens of the same document. With a `cache`,
        the tokens continue the cached ones (at their positions) and are added to it."""
        T = tokens_BT.shape[1]
        if cache is not None:
            return self._cached_forward(tokens_BT, cache)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        if position_ids_BT is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = self.rope_cos[position_ids_BT, None], self.rope_sin[position_ids_BT, None]
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, 1, T, E)
        mask_B1TT = None if doc_ids_BT is None else document_mask(doc_ids_BT)
        if self.causal_bias is not None:  # math attention: the additive form, once per forward
            mask_B1TT = self.causal_bias[:T, :T] if mask_B1TT is None \
                else additive_mask(mask_B1TT, T, T, tokens_BT.device)
        x_BTD = self.embed(tokens_BT)
        recompute = self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and i in self.checkpointed_blocks:
                # Non-reentrant: works with autocast, torch.compile and inputs without grad.
                x_BTD = checkpoint(block, x_BTD, cos, sin, mask_B1TT, use_reentrant=False)
            else:
                x_BTD = block(x_BTD, cos, sin, mask_B1TT)
        return self.lm_head(self.norm(x_BTD))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # a tied matrix is counted once

    def _cached_forward(self, tokens_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
        start, T = cache.length, tokens_BT.shape[1]
        if start + T > min(cache.max_tokens, self.cfg.max_seq_len):
            raise ValueError(f"{start} cached + {T} new tokens exceed the cache's "
                             f"{min(cache.max_tokens, self.cfg.max_seq_len)}")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x_BTD = self.embed(tokens_BT)
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, cos, sin, None, cache.layer(i))
        cache.length = start + T
        return self.lm_head(self.norm(x_BTD))

    def decode(self, tokens_B1: torch.Tensor, cache: BatchKVCache) -> torch.Tensor:
        """Next-token logits (B, 1, V) for one new token per row of the first B rows of a
        `BatchKVCache`, each at its own position (the row's length: RoPE per row) and
        attending to its own row's keys only; their keys and values are added."""
        B = tokens_B1.shape[0]
        lengths = cache.lengths[:B]
        limit = min(cache.max_tokens, self.cfg.max_seq_len)
        if max(lengths) >= limit:
            raise ValueError(f"a row of {max(lengths)} cached tokens is full (limit {limit})")
        positions_B = torch.tensor(lengths, device=tokens_B1.device)
        cos_B11E, sin_B11E = self.rope_cos[positions_B, None, None], \
            self.rope_sin[positions_B, None, None]
        keys_T = torch.arange(max(lengths) + 1, device=tokens_B1.device)
        mask_B11T = (keys_T[None, :] <= positions_B[:, None])[:, None, None]
        x_BTD = self.embed(tokens_B1)
        for i, block in enumerate(self.blocks):
            layer_cache = DecodeLayerCache(cache, i, positions_B, mask_B11T)
            x_BTD = block(x_BTD, cos_B11E, sin_B11E, None, layer_cache)
        for row in range(B):
            cache.lengths[row] += 1
        return self.lm_head(self.norm(x_BTD))
