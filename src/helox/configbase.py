"""The base of every config model and the one formatter of their validation errors, kept
apart from `helox.config` (which composes the component configs) so that every component can
define its config next to its code: this module imports nothing else of Helox."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin

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


# ---------------------------------------------------------------------------------------------
# One formatter of validation errors, shared by recipes (helox.config) and eval suites


def describe_error(err: Mapping[str, Any], root: type[BaseModel]) -> tuple[list[str], str]:
    """One pydantic error of validating `root` → (its location as the user writes it, a
    message naming the offending value, the close match of an unknown key, or the valid tags
    of a discriminated union)."""
    loc, holder, union = _walk(root, [str(part) for part in err["loc"]])
    kind, message = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        return loc, _unknown_key_message(loc[-1], holder)
    if kind == "missing":
        return loc, "required key is missing"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = str(err.get("ctx", {}).get("discriminator", "")).strip("'\"")
        tags = ", ".join(tag for m in union if (tag := _tag(m, field)) is not None)
        got = err["input"].get(field) if isinstance(err["input"], dict) else err["input"]
        return loc, (f"unknown {field} {got!r}; valid {field}s: {tags}" if got is not None
                     else f"each entry needs a `{field}` key, one of: {tags}")
    if kind not in PLAIN_MESSAGE_KINDS and "input" in err:
        message += f" (got {err['input']!r})"
    return loc, message


PLAIN_MESSAGE_KINDS = ("value_error", "assertion_error", "cross_section")
"""Error kinds whose message already says what is wrong with the value."""


def _walk(root: type[BaseModel], loc: list[str],
          ) -> tuple[list[str], type[BaseModel] | None, list[type[BaseModel]]]:
    """Follow an error location through the config models.

    Returns the location as the user writes it (pydantic inserts the tag of a discriminated
    union, e.g. `data.pipeline.0.domain_tag.rules`; the user wrote `data.pipeline.0.rules`),
    the model that holds its last key, and the models the last key may hold (a union's).
    """
    candidates: list[type[BaseModel]] = [root]
    path, holder = [], None
    for part in loc:
        by_tag = {tag: m for m in candidates for tag in _tags(m)}
        if part in by_tag and len(candidates) > 1:
            candidates = [by_tag[part]]
            continue
        path.append(part)
        if part.isdigit():
            continue
        holder = candidates[0] if len(candidates) == 1 else None
        field = holder.model_fields.get(part) if holder else None
        candidates = _models_of(field.annotation) if field else []
    return path, holder, candidates


def _tags(model: type[BaseModel]) -> list[str]:
    """The values a discriminated union may use to name `model`: those of its one-value
    Literal fields (`step: Literal["quality"] = "quality"`, `type: Literal["golden"]`)."""
    return [tag for name in model.model_fields if (tag := _tag(model, name)) is not None]


def _tag(model: type[BaseModel], field_name: str) -> str | None:
    field = model.model_fields.get(field_name)
    if field is None or get_origin(field.annotation) is not Literal:
        return None
    values = get_args(field.annotation)
    return values[0] if len(values) == 1 and isinstance(values[0], str) else None


def _unknown_key_message(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return "unknown key"
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(key, valid, n=1)
    guess = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key{guess} (valid keys: {', '.join(valid)})"


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in getattr(annotation, "__args__", ()):
        found.extend(m for m in _models_of(arg) if m not in found)
    return found
