"""What every `helox` subcommand shares: the two consoles, the common arguments and options,
and how a result is printed (`--json` or for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

out = Console(soft_wrap=True)
"""Results: stdout."""
console = Console(stderr=True)
"""Progress, warnings and errors: stderr."""

RecipeArg = Annotated[Path, typer.Argument(
    help="A YAML recipe file, or the name of a bundled one (quickstart, mixture).")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config value, e.g. --set train.max_steps=50 (repeatable).")]
RunDirOpt = Annotated[Optional[Path], typer.Option(
    help="Run folder (default: <workspace>/runs/<name>). Holding checkpoints, it is resumed.")]
ModelArg = Annotated[Path, typer.Argument(
    metavar="MODEL", help="A run folder (its newest valid checkpoint) or one checkpoint folder.")]
AnyModelArg = Annotated[Path, typer.Argument(
    metavar="MODEL", help="A run folder (its newest valid checkpoint), one checkpoint folder, "
                          "or an exported Hugging Face folder.")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the result as one JSON document on stdout (progress and warnings "
                   "stay on stderr).")]
EmaOpt = Annotated[bool, typer.Option(help="Use the weights' moving average (runs trained "
                                            "with train.ema_decay).")]


def emit(as_json: bool, record: Any, show: Callable[[], None]) -> None:
    """The result: as JSON, or as `show` prints it for people."""
    if as_json:
        print(json.dumps(record, indent=1, default=str, allow_nan=True))
    else:
        show()


def warn(message: str) -> None:
    console.print("[yellow]warning:[/]", escape(message))


WorkspaceOpt = Annotated[Path, typer.Option(
    "--workspace", "-w", help="Workspace folder holding datasets/ and runs/.")]
