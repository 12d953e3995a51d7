"""The public API: what a library user calls, re-exported by `helox` itself.

    import helox

    config = helox.load_config("quickstart", ["train.max_steps=50", "train.compile=false"])
    result = helox.train(config)                     # prepares the dataset, trains, resumes
    model = helox.load_trained_model(result.run_dir) # newest valid checkpoint
    print(model.complete("ROMEO.", max_new_tokens=20))
    helox.export_model(result.run_dir, "gguf", gguf_type="Q8_0")
    print(helox.evaluate(result.run_dir, "quickstart").result.failures())

Each function is the one the CLI command of the same name runs; the CLI adds only printing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from helox.checkpoint import TrainedModel, resolve_checkpoint
from helox.checkpoint import load_trained_model as _load_checkpoint
from helox.config import RunConfig
from helox.config import load_config as _load_config
from helox.data.prepare import prepare_dataset as _prepare_dataset
from helox.data.shards import DatasetVersion
from helox.distributed.job import join_job
from helox.eval.runner import EvalOutcome
from helox.eval.runner import evaluate as _evaluate
from helox.export.exporter import Exported
from helox.export.exporter import export_model as _export_model
from helox.resources import resolve_recipe
from helox.run import default_run_dir, prepare_for_job
from helox.training.loop import TrainResult
from helox.training.loop import train as _train
from helox.training.setup import pick_device

Warn = Callable[[str], None]


def load_config(recipe: Path | str, overrides: Sequence[str] = ()) -> RunConfig:
    """A recipe file, or a bundled recipe by name (`quickstart`), with `a.b=value`
    overrides; raises ConfigError listing every problem."""
    return _load_config(resolve_recipe(recipe), list(overrides))


def prepare_dataset(config: RunConfig) -> DatasetVersion:
    """Sources → cleaning pipeline → tokenizer → shards: the dataset version the config
    describes (reused when its inputs are unchanged)."""
    return _prepare_dataset(config)


def train(config: RunConfig, dataset: DatasetVersion | None = None,
          run_dir: Path | None = None, until_step: int | None = None,
          console: Console | None = None) -> TrainResult:
    """Train (or resume) in `run_dir` (default WORKSPACE/runs/NAME), preparing the dataset
    first unless one is given. Under torchrun every process calls this: it joins the job, rank
    0 prepares the dataset and the others open the version it made."""
    job = join_job(config.parallel, pick_device(config.train.device))
    if dataset is None:
        dataset = prepare_for_job(config, job, lambda: _prepare_dataset(config, purpose="train"))
    return _train(config, Path(run_dir) if run_dir else default_run_dir(config), dataset,
                  until_step=until_step, console=console)


def load_trained_model(model: Path | str, ema: bool = False,
                       warn: Warn = lambda message: None) -> TrainedModel:
    """A run folder's newest valid checkpoint, or a checkpoint folder, as a model with its
    tokenizer (`.model`, `.tokenizer`, `.complete(prompt)`)."""
    return _load_checkpoint(resolve_checkpoint(Path(model), warn), ema=ema)


def export_model(model: Path | str, fmt: str, out: Path | None = None, gguf_type: str = "F16",
                 ema: bool = False, overwrite: bool = False, key: Path | None = None,
                 ) -> Exported:
    """Export a run's newest valid checkpoint (or a checkpoint folder) as `hf`, `onnx`,
    `gguf` (gguf_type F32, F16, Q8_0, Q4_0) or `tensorrt`, with a signed manifest."""
    return _export_model(Path(model), fmt, out, gguf_type, ema, overwrite, key)


def evaluate(model: Path | str, suite: str, baseline: str | None = None, ema: bool = False,
             batch_size: int = 8) -> EvalOutcome:
    """Score a model (run, checkpoint or Hugging Face folder) on an eval suite (a bundled
    name or a suite.yaml); `.result.failures()` lists the thresholds it missed."""
    return _evaluate(Path(model), suite, baseline, ema, batch_size)
