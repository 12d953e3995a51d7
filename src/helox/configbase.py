"""The base of every config model, kept apart from `helox.config` so that components (data
pipeline steps, …) can define their own config next to their code without an import cycle."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, field docstrings are the docs."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              use_attribute_docstrings=True)


def resolve_input_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Resolve against the recipe folder (passed as validation context) and require existence.

    Use as `field_validator("path")(resolve_input_path)`; `check_files=False` in the context
    skips the existence check (configs saved in run folders whose inputs may be gone).
    """
    if value is None:
        return None
    context = info.context or {}
    path = value.expanduser()
    if not path.is_absolute() and context.get("base_dir") is not None:
        path = Path(context["base_dir"]) / path
    path = path.resolve()
    if context.get("check_files", True) and not path.exists():
        raise ValueError(f"file not found: {path}")
    return path
