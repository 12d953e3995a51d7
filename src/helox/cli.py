"""The `helox` command. Each subcommand is a thin shell around one library function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from helox.errors import HeloxError

app = typer.Typer(
    help="Helox: raw text to a trained, resumable, Hugging Face-compatible model.\n\n"
         "Example: helox run recipes/quickstart.yaml",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
    add_completion=False,
)
data_app = typer.Typer(help="Build and inspect datasets.\n\nExample: helox data prepare "
                            "recipes/quickstart.yaml", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe, e.g. recipes/quickstart.yaml")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a config value, e.g. --set train.max_steps=50 (repeatable).")]
RunDirOpt = Annotated[Optional[Path], typer.Option(
    help="Run folder (default: <workspace>/runs/<name>). Holding checkpoints, it is resumed.")]


def _load(recipe: Path, sets: list[str] | None):
    from helox.config import load_config

    return load_config(recipe, sets or [])


@app.command()
def run(recipe: RecipeArg, set_: SetOpt = None, run_dir: RunDirOpt = None) -> None:
    """Run the whole job: prepare data, train (resuming if possible), sample, print artifacts.

    Example: helox run recipes/quickstart.yaml --set train.max_steps=200
    """
    from helox.run import default_run_dir, run_recipe

    config = _load(recipe, set_)
    run_recipe(config, run_dir or default_run_dir(config), console)


@data_app.command("prepare")
def data_prepare(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Tokenize the recipe's sources into shards and print the dataset version.

    Trains the BPE tokenizer unless tokenizer.path names one. Prepared versions are cached by
    their inputs, so running it twice builds once.

    Example: helox data prepare recipes/quickstart.yaml --set tokenizer.vocab_size=8192
    """
    from helox.run import prepare_with_progress

    dataset = prepare_with_progress(_load(recipe, set_), console)
    print(dataset.version)


@app.command("train")
def train_cmd(recipe: RecipeArg, set_: SetOpt = None, run_dir: RunDirOpt = None,
              until_step: Annotated[Optional[int], typer.Option(
                  help="Stop after this step (checkpointed) as if preempted; the schedule still "
                       "runs to train.max_steps and a later `helox train` resumes.")] = None,
              ) -> None:
    """Train a model from a recipe; resumes from the newest valid checkpoint in the run folder.

    Example: helox train recipes/quickstart.yaml --run-dir workspace/runs/qs --set optim.lr=1e-3
    """
    from helox.run import default_run_dir, prepare_with_progress
    from helox.train.loop import train

    config = _load(recipe, set_)
    dataset = prepare_with_progress(config, console)
    result = train(config, run_dir or default_run_dir(config), dataset, until_step, console)
    console.print(f"step {result.step}: checkpoint {result.checkpoint}")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Run folder or one checkpoint folder.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample among the top k.")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Continue a prompt with the newest valid checkpoint of a run.

    Example: helox generate workspace/runs/quickstart --prompt "ROMEO." --max-new-tokens 40
    """
    from helox.model.generate import complete
    from helox.train.checkpoint import load_trained_model, newest_valid_checkpoint

    path = run_dir if (run_dir / "model.safetensors").is_file() else newest_valid_checkpoint(
        run_dir, warn=lambda m: console.print("[yellow]warning:[/]", escape(m)))
    model, tokenizer, config = load_trained_model(path)
    stop_id = tokenizer.token_to_id(config.tokenizer.eos_token)
    text = complete(model, tokenizer, prompt, stop_id, max_new_tokens, temperature, top_k, seed)
    print(prompt + text)


def main() -> None:
    try:
        app()
    except HeloxError as exc:
        console.print("[bold red]error:[/]", escape(exc.message), highlight=False)
        if exc.hint:
            console.print("  fix:", escape(exc.hint), highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
