"""The decoder's shape: the model package's own config (it imports nothing else of Helox but
the config base)."""

from __future__ import annotations

from pydantic import Field, model_validator

from helox.configbase import StrictModel


class ModelConfig(StrictModel):
    vocab_size: int | None = Field(default=None, gt=0)
    """Embedding rows; None takes the tokenizer's size rounded up to `pad_vocab_multiple`."""
    pad_vocab_multiple: int = Field(default=64, ge=1)
    """Round the tokenizer's vocabulary up to a multiple of this (faster matmuls)."""
    d_model: int = Field(default=256, gt=0)
    """Width of the residual stream."""
    num_layers: int = Field(default=4, gt=0)
    """Number of decoder blocks."""
    num_heads: int = Field(default=4, gt=0)
    """Attention (query) heads per block."""
    num_kv_heads: int | None = Field(default=None, gt=0)
    """Key/value heads (grouped-query attention); None means num_heads (multi-head)."""
    d_ffn: int | None = Field(default=None, gt=0)
    """SwiGLU hidden width; None means 8/3 * d_model rounded up to a multiple of 64."""
    max_seq_len: int = Field(default=512, gt=0)
    """Longest sequence the model is built for (RoPE tables are sized to it)."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """RoPE base frequency."""
    norm_eps: float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output head."""
    init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the normal weight init (output projections scaled by depth)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if (self.d_model // self.num_heads) % 2:
            raise ValueError("head dimension d_model / num_heads must be even for RoPE")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.kv_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ffn is not None:
            return self.d_ffn
        return -(-(8 * self.d_model // 3) // 64) * 64
