"""Conversion between Helox Llama and Hugging Face `transformers` Llama (config and weights).

Both use the rotate-half RoPE layout, so weights map one to one by name; nothing is permuted.
`transformers` is only imported by the functions that build its objects.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from helox.model.config import ModelConfig
from helox.errors import HeloxError

if TYPE_CHECKING:
    from transformers import LlamaConfig

# Helox name pattern -> Hugging Face name pattern; {i} is the layer index.
_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{f"blocks.{{i}}.attn.{p}.weight": f"model.layers.{{i}}.self_attn.{p}.weight"
       for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"blocks.{{i}}.mlp.{p}.weight": f"model.layers.{{i}}.mlp.{p}.weight"
       for p in ("gate_proj", "up_proj", "down_proj")},
}


def _compile(patterns: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"),
             dst.replace("{i}", r"\1")) for src, dst in patterns.items()]


_TO_HF = _compile(_NAMES)
_FROM_HF = _compile({dst: src for src, dst in _NAMES.items()})


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    raise HeloxError(f"no conversion rule for weight '{name}'",
                     hint="only Llama-architecture weights convert between Helox and HF")


def hf_to_helox_name(name: str) -> str:
    return _rename(name, _FROM_HF)


def helox_to_hf_name(name: str) -> str:
    return _rename(name, _TO_HF)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Helox weights → HF LlamaForCausalLM weights (a tied head is left out, as HF saves it)."""
    return {_rename(name, _TO_HF): tensor for name, tensor in state.items()
            if not (cfg.tie_embeddings and name == "lm_head.weight")}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM weights → Helox weights (rotary caches in the HF dict are skipped)."""
    out = {_rename(name, _FROM_HF): tensor for name, tensor in state.items()
           if not name.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def to_hf_config(cfg: ModelConfig, **extra) -> LlamaConfig:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, hidden_act="silu", attention_bias=False, mlp_bias=False,
        **extra,
    )


def from_hf_config(hf: LlamaConfig) -> ModelConfig:
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise HeloxError(f"RoPE scaling '{rope['rope_type']}' is not supported yet",
                         hint="convert a Llama checkpoint that uses plain RoPE")
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if hf.hidden_act != "silu" or getattr(hf, "attention_bias", False) or getattr(
            hf, "mlp_bias", False):
        raise HeloxError("only Llama configs with SiLU and no biases convert to Helox")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise HeloxError(f"head_dim {head_dim} × heads ≠ hidden_size {hf.hidden_size}",
                         hint="Helox derives head_dim from d_model / num_heads")
    return ModelConfig(
        vocab_size=hf.vocab_size, d_model=hf.hidden_size, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        d_ffn=hf.intermediate_size, max_seq_len=hf.max_position_embeddings,
        rope_theta=float(theta), norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(hf.tie_word_embeddings), init_std=hf.initializer_range,
    )
