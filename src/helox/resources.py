"""Files that ship inside the package: recipes, eval suites (with the lm-eval tasks) and the
bundled corpus. They are found through `importlib.resources`, so a wheel installed anywhere
finds them as a checkout does; a recipe is then named rather than located
(`helox run quickstart`)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from helox.errors import HeloxError


def bundled(folder: str) -> Path:
    """A folder of package data. Helox is installed as files (a wheel or a checkout), so it
    is a real path that recipes can refer to relative to themselves."""
    path = Path(str(files("helox").joinpath(folder)))
    if not path.is_dir():
        raise HeloxError(f"Helox's bundled {folder}/ is missing ({path})",
                         hint="reinstall Helox (pip install --force-reinstall helox)")
    return path


def recipes_dir() -> Path:
    return bundled("recipes")


def suites_dir() -> Path:
    return bundled("evals")


def lm_eval_tasks_dir() -> Path:
    return bundled("evals") / "lm_eval"


def corpus_dir() -> Path:
    return bundled("corpus")


def bundled_recipes() -> list[str]:
    return sorted(path.stem for path in recipes_dir().glob("*.yaml"))


def resolve_recipe(recipe: Path | str) -> Path:
    """A recipe file as given, else the bundled recipe of that name (`quickstart`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    named = recipes_dir() / f"{str(recipe).removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and named.is_file():
        return named
    raise HeloxError(f"no recipe {str(recipe)!r}: not a file, nor a bundled recipe",
                     hint=f"pass a YAML file, or one of: {', '.join(bundled_recipes())}")
