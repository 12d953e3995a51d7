"""`helox run`, the main job on one recipe: data → tokenizer → shards → train → samples, then
the recipe's `release` stages (evaluate → export → parity → register → promote)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from helox.checkpoint import list_checkpoints, load_trained_model
from helox.config import RunConfig
from helox.data.prepare import open_version, prepare_dataset
from helox.data.report import summary_line, synthetic_lines
from helox.data.shards import DatasetVersion
from helox.distributed.job import Job, from_main
from helox.observe.metrics import read_metrics
from helox.observe.report import write_report
from helox.release import ReleaseSummary, release
from helox.training.loop import TrainResult, train


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


def prepare_for_job(config: RunConfig, job: Job,
                    prepare: Callable[[], DatasetVersion]) -> DatasetVersion:
    """The dataset a (possibly multi-process) training job reads: rank 0 builds or finds it
    with `prepare` (which records the read in the audit log for the job); the other ranks
    open the version it names."""
    dataset = prepare() if job.main else None
    chosen = from_main(dataset.version if dataset else None, job)
    return dataset if job.main else open_version(config, chosen)


@dataclass
class RunSummary:
    """What `helox run` hands back: the dataset, the training result, the samples, and the
    validation loss against the corpus's unigram entropy."""

    dataset: DatasetVersion
    result: TrainResult
    samples: list[tuple[str, str]]
    val_loss: float | None
    release: ReleaseSummary | None = None

    @property
    def unigram_entropy(self) -> float:
        return self.dataset.manifest["stats"]["unigram_entropy_nats"]

    def artifacts(self) -> list[tuple[str, str]]:
        run_dir = self.result.run_dir
        return [("dataset version", f"{self.dataset.version}  {self.dataset.path}"),
                ("tokenizer", str(self.dataset.tokenizer_path)),
                ("run folder", str(run_dir)),
                *(("checkpoint", str(p)) for p in list_checkpoints(run_dir)),
                ("metrics", str(run_dir / "metrics.jsonl")),
                ("config", str(run_dir / "config.yaml")),
                ("fingerprint", str(run_dir / "run.json")),
                ("dashboard", str(run_dir / "report.html"))]

    def as_dict(self) -> dict:
        return {"dataset_version": self.dataset.version, "dataset": str(self.dataset.path),
                "run_dir": str(self.result.run_dir), "step": self.result.step,
                "checkpoints": [str(p) for p in list_checkpoints(self.result.run_dir)],
                "val_loss": self.val_loss, "unigram_entropy": self.unigram_entropy,
                "samples": [{"prompt": p, "completion": t} for p, t in self.samples],
                "release": self.release.as_dict() if self.release else None}


def run_recipe(config: RunConfig, run_dir: Path, console: Console) -> RunSummary | None:
    """Prepare, train (or resume), write the dashboard and sample; None when a signal
    stopped training (it is checkpointed, and the same command resumes)."""
    dataset = prepare_with_progress(config, console, purpose="train")
    result = train(config, run_dir, dataset, console=console)
    if result.stopped_by:
        return None
    samples = sample_texts(result, config)
    write_report(result.run_dir)
    val_losses = [m["val_loss"] for m in read_metrics(result.run_dir / "metrics.jsonl")
                  if "val_loss" in m]
    summary = RunSummary(dataset, result, samples, val_losses[-1] if val_losses else None)
    if config.release is not None:
        summary.release = release(config.release, list_checkpoints(result.run_dir)[0],
                                  config.workspace, console)
    return summary


def sample_texts(result: TrainResult, config: RunConfig) -> list[tuple[str, str]]:
    trained = load_trained_model(list_checkpoints(result.run_dir)[0])
    sc = config.sample
    return [(prompt, trained.complete(prompt, sc.max_new_tokens, sc.temperature, sc.top_k,
                                      seed=config.train.seed)) for prompt in sc.prompts]


def print_summary(console: Console, summary: RunSummary) -> None:
    for prompt, text in summary.samples:
        console.rule(f"sample: {prompt!r}")
        console.print(prompt + text, markup=False, highlight=False)
    rows = summary.artifacts()
    if summary.val_loss is not None:
        rows.append(("validation loss", f"{summary.val_loss:.3f} nats/token (unigram entropy "
                                        f"of the training tokens: {summary.unigram_entropy:.3f})"))
    rows += _next_steps(summary)
    console.rule("artifacts")
    for label, value in rows:  # one line each, never wrapped, so paths can be copied
        console.print(f"{label:<16} {value}", soft_wrap=True, markup=False, highlight=False)


def _next_steps(summary: RunSummary) -> list[tuple[str, str]]:
    run_dir, done = summary.result.run_dir, summary.release
    if done is None:
        return [("evaluate", f"helox eval {run_dir} --suite quickstart"),
                ("export", f"helox export {run_dir} --format hf   (or onnx, gguf --type Q8_0)"),
                ("check exports", f"helox parity {run_dir}")]
    rows = [("eval results", str(done.eval_folder)),
            *((f"export {name}", str(path)) for name, path in done.exports.items())]
    if done.parity is not None:
        rows.append(("parity", str(done.parity)))
    if done.registered is None:
        return rows
    info = done.registered
    alias = done.promoted_to or "dev"
    workspace = f" -w {done.workspace}" if done.workspace != Path("workspace") else ""
    return rows + [
        ("registered", f"{info.uri}  (helox registry show {info.name} @{alias}{workspace})"),
        ("serve", f"helox serve models:/{info.name}@{alias}{workspace} --port 8000"),
        ("then ask it", "curl -s localhost:8000/v1/completions -H 'Content-Type: "
                        "application/json' -d '{\"model\": \"" + info.name + "\", "
                        "\"prompt\": \"And God said\", \"max_tokens\": 24}'"),
        ("or in Python", "openai.OpenAI(base_url='http://localhost:8000/v1', api_key='-')"
                         f".completions.create(model='{info.name}', prompt='ROMEO.', "
                         "max_tokens=24)")]
