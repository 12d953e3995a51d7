"""The data section of a recipe: sources, the cleaning pipeline, synthetic tasks, and the
tokenizer. Each pipeline step's config lives next to the step's code."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field, field_validator, model_validator

from helox.configbase import StrictModel, resolve_input_path
from helox.data.chat import ChatDataConfig
from helox.data.contamination import ContaminationConfig
from helox.data.dedup import ExactDedupConfig, NearDedupConfig, SemanticDedupConfig
from helox.data.domains import DomainTagConfig
from helox.data.filters import NormalizeConfig, QualityConfig
from helox.data.safety import PiiConfig, SecretsConfig
from helox.data.sources import SourceConfig
from helox.data.synthetic import SyntheticTaskConfig


PipelineStepConfig = Annotated[
    Union[NormalizeConfig, QualityConfig, PiiConfig, SecretsConfig, ExactDedupConfig,
          NearDedupConfig, SemanticDedupConfig, ContaminationConfig, DomainTagConfig],
    Field(discriminator="step"),
]
"""One entry of `data.pipeline`; its `step` key picks the kind."""


class DataConfig(StrictModel):
    name: str = Field(default="default", pattern=r"^[A-Za-z0-9._-]+$")
    """Dataset name: versions built under one name form its history and share its access list."""
    version: str | None = None
    """Use this existing dataset version (or a unique prefix) instead of building from sources."""
    train: list[SourceConfig] = []
    """Sources of training documents."""
    val: list[SourceConfig] = []
    """Sources of held-out validation documents (needed when train.eval_every_steps > 0)."""
    pipeline: list[PipelineStepConfig] = []
    """Cleaning steps applied in order to every split (normalize, quality, pii, secrets,
    exact_dedup, near_dedup, semantic_dedup, domain_tag) and to the train split only
    (contamination)."""
    synthetic: list[SyntheticTaskConfig] = []
    """Generated long-range tasks (passkey, kv_recall, variable_tracking), each written into
    its own domain of both splits; they skip the cleaning pipeline (nothing to clean, and its
    quality rules would drop them)."""
    min_trust: float = Field(default=0.0, ge=0, le=1)
    """Sources whose `trust` is below this are excluded from the build (and reported)."""
    as_of: dt.date | None = None
    """The date source expiry is judged on; None means today (set it for reproducible builds)."""
    num_workers: int = Field(default=1, ge=1)
    """Processes that run the per-document steps (the dataset is identical for any number)."""
    shard_size_tokens: int = Field(default=1 << 22, gt=0)
    """Target number of tokens per binary shard file."""
    chat: ChatDataConfig | None = None
    """How `format: chat` sources become training rows: template, trained tokens, row length
    (defaults apply when a chat source is given without it)."""

    @property
    def chat_kind(self) -> str | None:
        """"chat" (conversations) or "preference" (pairs) when the sources are, else None."""
        kinds = {s.format for s in [*self.train, *self.val]} & {"chat", "preference"}
        return next(iter(kinds)) if kinds else None

    @property
    def is_chat(self) -> bool:
        return self.chat_kind is not None

    @model_validator(mode="after")
    def _sources_or_version(self) -> DataConfig:
        if not self.train and self.version is None:
            raise ValueError("give training sources in data.train, or an existing dataset "
                             "version in data.version")
        kinds = {source.format if source.format in ("chat", "preference") else "text"
                 for source in [*self.train, *self.val]}
        if len(kinds) > 1:
            raise ValueError(f"the sources mix {' and '.join(sorted(kinds))} formats; a dataset "
                             "is all conversations, all preference pairs or all text (inject "
                             "another kind as a second dataset through curriculum.inject)")
        if self.is_chat and self.synthetic:
            raise ValueError("synthetic tasks write text documents; a chat dataset cannot "
                             "hold them")
        if self.is_chat and self.chat is None:
            self.chat = ChatDataConfig()
        domains = [task.domain_name for task in self.synthetic]
        if len(domains) != len(set(domains)):
            raise ValueError(f"two synthetic tasks write the same domain: {domains}; give each "
                             "a distinct `domain`")
        return self


class TokenizerConfig(StrictModel):
    path: Path | None = None
    """An existing Hugging Face `tokenizer.json` to use; None trains a byte-level BPE, or,
    when train.init_from names a checkpoint, uses that checkpoint's tokenizer."""
    vocab_size: int = Field(default=4096, ge=260)
    """Vocabulary size of the trained BPE (256 byte symbols + special tokens + merges)."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair must occur this often in the training text to become a merge."""
    eos_token: str = "<|endoftext|>"
    """End-of-document token, appended after every document when packing."""

    _check_path = field_validator("path")(resolve_input_path)
