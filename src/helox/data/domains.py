"""Domain tagging: give each document the domain whose patterns it matches most.

Rules are regular expressions per domain with a minimum number of matches. The domain decides
the per-domain token counts of the manifest and, later, the mixture weights of the loader.
A rule-based tagger is transparent and deterministic; a learned classifier (fastText-style)
would be a second implementation of the same step when a user needs one.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Iterable, Iterator, Literal

from pydantic import Field, field_validator

from helox.configbase import StrictModel
from helox.data.document import Document
from helox.data.pipeline import StepStats
from helox.data.sources import DEFAULT_DOMAIN


class DomainRule(StrictModel):
    domain: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Domain given to documents this rule wins on."""
    patterns: list[str] = Field(min_length=1)
    """Regular expressions (Python syntax, multiline mode); every match counts."""
    min_matches: int = Field(default=1, ge=1)
    """Matches needed before this rule can tag a document."""

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from None
        return patterns


class DomainTagConfig(StrictModel):
    step: Literal["domain_tag"] = "domain_tag"
    scope: ClassVar[str] = "document"
    rules: list[DomainRule] = Field(min_length=1)
    """Candidate domains; the rule with the most matches wins (ties: the earlier rule)."""
    overwrite: bool = False
    """Also re-tag documents whose source already gave them a domain other than 'default'."""
    max_chars_scanned: int = Field(default=20_000, gt=0)
    """Only the first this many characters are matched (bounds the cost on huge documents)."""

    def build(self) -> DomainTagger:
        return DomainTagger(self)


class DomainTagger:
    name = "domain_tag"
    scope = "document"

    def __init__(self, config: DomainTagConfig):
        self.config = config
        self.rules = [(rule, [re.compile(p, re.MULTILINE) for p in rule.patterns])
                      for rule in config.rules]

    def tag(self, text: str) -> str | None:
        text = text[: self.config.max_chars_scanned]
        best, best_count = None, 0
        for rule, patterns in self.rules:
            count = sum(len(p.findall(text)) for p in patterns)
            if count >= rule.min_matches and count > best_count:
                best, best_count = rule.domain, count
        return best

    def run(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            if doc.domain != DEFAULT_DOMAIN and not self.config.overwrite:
                yield doc
                continue
            domain = self.tag(doc.text)
            if domain is not None and domain != doc.domain:
                stats.change(f"tagged_{domain}")
                doc = dataclasses.replace(doc, domain=domain)
            yield doc
