"""`helox run`, the main job on one recipe: data → tokenizer → shards → train → samples."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from helox.config import RunConfig
from helox.data.prepare import prepare_dataset
from helox.data.report import summary_line, synthetic_lines
from helox.data.shards import DatasetVersion
from helox.model.generate import complete
from helox.observe.metrics import read_metrics
from helox.observe.report import write_report
from helox.train.checkpoint import list_checkpoints, load_trained_model
from helox.train.loop import TrainResult, train


def default_run_dir(config: RunConfig) -> Path:
    return config.workspace / "runs" / config.name


def prepare_with_progress(config: RunConfig, console: Console,
                          purpose: str = "prepare") -> DatasetVersion:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("reading sources")
        def report(stage: str, done: int) -> None:
            progress.update(task, description=f"{stage}: {done:,} docs")

        dataset = prepare_dataset(config, report, purpose)
    split = dataset.split("train")
    console.print(f"dataset {dataset.version}: {split['num_tokens']:,} training tokens in "
                  f"{len(split['shards'])} shard(s), {dataset.path}", soft_wrap=True)
    for name, statistics in dataset.report.get("splits", {}).items():
        console.print(summary_line(name, statistics), markup=False, soft_wrap=True)
    for line in synthetic_lines(dataset.report):
        console.print(line, markup=False, soft_wrap=True)
    return dataset


def run_recipe(config: RunConfig, run_dir: Path, console: Console) -> None:
    dataset = prepare_with_progress(config, console, purpose="train")
    result = train(config, run_dir, dataset, console=console)
    if result.stopped_by:  # preempted: checkpointed, and the same command resumes
        return
    samples = sample_texts(result, config)
    write_report(result.run_dir)
    print_summary(console, config, dataset, result, samples)


def sample_texts(result: TrainResult, config: RunConfig) -> list[tuple[str, str]]:
    checkpoint = list_checkpoints(result.run_dir)[0]
    model, tokenizer, saved = load_trained_model(checkpoint)
    eos = tokenizer.token_to_id(saved.tokenizer.eos_token)
    sc = config.sample
    return [(prompt, complete(model, tokenizer, prompt, eos, sc.max_new_tokens, sc.temperature,
                              sc.top_k, seed=config.train.seed)) for prompt in sc.prompts]


def print_summary(console: Console, config: RunConfig, dataset: DatasetVersion,
                  result: TrainResult, samples: list[tuple[str, str]]) -> None:
    for prompt, text in samples:
        console.rule(f"sample: {prompt!r}")
        console.print(prompt + text, markup=False, highlight=False)
    entropy = dataset.manifest["stats"]["unigram_entropy_nats"]
    val_losses = [m["val_loss"] for m in read_metrics(result.run_dir / "metrics.jsonl")
                  if "val_loss" in m]
    rows = [
        ("dataset version", f"{dataset.version}  {dataset.path}"),
        ("tokenizer", str(dataset.tokenizer_path)),
        ("run folder", str(result.run_dir)),
        *(("checkpoint", str(p)) for p in list_checkpoints(result.run_dir)),
        ("metrics", str(result.run_dir / "metrics.jsonl")),
        ("config", str(result.run_dir / "config.yaml")),
        ("fingerprint", str(result.run_dir / "run.json")),
        ("dashboard", str(result.run_dir / "report.html")),
    ]
    if val_losses:
        rows.append(("validation loss", f"{val_losses[-1]:.3f} nats/token (unigram entropy "
                                        f"of the training tokens: {entropy:.3f})"))
    run_dir = result.run_dir
    rows += [("evaluate", f"helox eval {run_dir} --suite quickstart"),
             ("export", f"helox export {run_dir} --format hf   (or onnx, gguf --type Q8_0)"),
             ("check exports", f"helox parity {run_dir}")]
    console.rule("artifacts")
    for label, value in rows:  # one line each, never wrapped, so paths can be copied
        console.print(f"{label:<16} {value}", soft_wrap=True, markup=False, highlight=False)
