"""The unit every data step works on."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Document:
    """One document; steps return changed copies (`dataclasses.replace`), never mutate."""

    id: str
    text: str
    domain: str
    source: str
    metadata: dict = field(default_factory=dict)
