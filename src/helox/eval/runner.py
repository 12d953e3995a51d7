"""`helox eval`: score a model on a suite, check the items for contamination first, store the
results per model version, gate on thresholds and on regression against a baseline.

    run_suite(lm, suite, dataset)   -> SuiteResult (pure: no files written)
    evaluate(path, suite_name, ...) -> EvalOutcome (loads, runs, writes, compares)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from helox.checkpoint import read_run_info, run_dir_of
from helox.data.shards import DatasetVersion
from helox.data.versions import run_dataset
from helox.errors import HeloxError
from helox.eval import tasks as T
from helox.eval.contamination import contaminated_items
from helox.eval.lm import LanguageModel, load_language_model
from helox.eval.results import (RESULTS_FILE, Comparison, SuiteResult, compare, read_items,
                                task_result, write_results)
from helox.eval.suite import (GoldenTask, LoadedSuite, PerplexityTask, RecallTask,
                              ToolCallTask, load_suite)


def run_suite(lm: LanguageModel, loaded: LoadedSuite, dataset: DatasetVersion | None,
              progress: Progress | None = None, contamination: dict | None = None
              ) -> SuiteResult:
    """Prepare every task's items, check them against the training data (unless a check of
    the same suite and dataset is passed in), score, aggregate."""
    prepared = prepare_tasks(lm, loaded, dataset)
    if contamination is None:
        contamination = check_contamination(lm, loaded, dataset, prepared, progress)
    rows_by_task, results = {}, []
    for task in loaded.suite.tasks:
        advance = _progress_task(progress, task.name, len(prepared[task.name]))
        rows = _score(lm, task, prepared[task.name], advance)
        for row in rows:
            row.contaminated = (task.name, row.id) in contamination["flagged"]
        rows_by_task[task.name] = rows
        results.append(task_result(task.name, task.type, rows, task.thresholds))
    summary = {k: v for k, v in contamination.items() if k != "flagged"}
    return SuiteResult(loaded.name, loaded.sha256, lm.version, lm.source, results,
                       [r for rows in rows_by_task.values() for r in rows], summary)


def prepare_tasks(lm: LanguageModel, loaded: LoadedSuite, dataset: DatasetVersion | None
                  ) -> dict[str, list]:
    return {task.name: _prepare(lm, task, loaded, dataset) for task in loaded.suite.tasks}


def _prepare(lm: LanguageModel, task, loaded: LoadedSuite, dataset: DatasetVersion | None):
    """What each task scores: golden items, documents, or generated probes."""
    if isinstance(task, GoldenTask | ToolCallTask):
        return loaded.items[task.name]
    if isinstance(task, PerplexityTask):
        if task.source == "validation":
            if dataset is None:
                raise HeloxError(f"task {task.name} reads the run's validation split, but this "
                                 "model has no dataset version beside it",
                                 hint="evaluate a run folder, or give the task a file (path:)")
            return T.validation_documents(dataset, lm.eos_id, task.max_documents)
        return T.file_documents(lm, task, loaded.path.parent)
    if isinstance(task, RecallTask):
        return T.recall_probes(task)
    return T.reasoning_probes(task)


def _score(lm: LanguageModel, task, prepared, advance) -> list[T.ItemRow]:
    if isinstance(task, GoldenTask):
        return T.score_golden(lm, task, prepared, advance)
    if isinstance(task, PerplexityTask):
        return T.score_perplexity(lm, task, prepared, advance)
    if isinstance(task, ToolCallTask):
        return T.score_tool_calls(lm, task, prepared, advance)
    return T.score_exact_answers(lm, task.name, prepared, advance)


def _item_texts(lm: LanguageModel, task, prepared) -> dict[tuple[str, str], str]:
    """The text of each item that the training data must not contain: golden prompt and
    answer, a file document's text. Validation documents and generated probes are left out:
    the first are held out by construction, the second are random."""
    if isinstance(task, GoldenTask):
        return {(task.name, str(i.id)): " ".join(filter(None, [
            i.prompt, i.target, i.choices[i.answer] if i.choices else None])) for i in prepared}
    if isinstance(task, PerplexityTask) and task.path is not None:
        return {(task.name, doc_id): text for doc_id, _, _, text in prepared}
    if isinstance(task, ToolCallTask):
        return {(task.name, T.tool_item_id(conversation, index)): " ".join(
            m.content for m in conversation.messages if m.role == "user" and m.content)
            for index, conversation in enumerate(prepared)}
    return {}


def check_contamination(lm: LanguageModel, loaded: LoadedSuite, dataset, prepared,
                        progress: Progress | None = None) -> dict:
    """Which items of the suite the dataset's training documents contain ("flagged": a set of
    (task, item id)), with a summary for the results file."""
    texts = {}
    for task in loaded.suite.tasks:
        texts.update(_item_texts(lm, task, prepared[task.name]))
    check = loaded.suite.contamination
    if dataset is None or not texts:
        return {"checked": False, "reason": "no training dataset beside the model"
                if dataset is None else "no item to check", "flagged": set()}
    advance = _progress_task(progress, "contamination check",
                             dataset.split("train")["num_tokens"])
    keyed = {f"{task}\t{item}": text for (task, item), text in texts.items()}
    hits = contaminated_items(keyed, dataset, lm.tokenizer, check.ngram_words,
                              check.min_overlap_ngrams, advance)
    flagged = {tuple(key.split("\t", 1)) for key in hits}
    return {"checked": True, "dataset_version": dataset.version,
            "ngram_words": check.ngram_words, "min_overlap_ngrams": check.min_overlap_ngrams,
            "items_checked": len(texts),
            "contaminated": sorted(f"{task}/{item}" for task, item in flagged),
            "shared_ngrams": {key.replace("\t", "/"): {"count": len(grams), "first": grams[:3]}
                              for key, grams in sorted(hits.items())},
            "flagged": flagged}


def _progress_task(progress: Progress | None, name: str, total: int) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    task_id = progress.add_task(name, total=total)
    return lambda n: progress.advance(task_id, n)


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class EvalOutcome:
    result: SuiteResult
    folder: Path
    comparisons: list[Comparison]
    baseline: str | None

    @property
    def regressions(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.regression]

    @property
    def passed(self) -> bool:
        return not self.result.failures() and not self.regressions


def evaluate(path: Path, suite_name: str, baseline: str | None = None, ema: bool = False,
             batch_size: int = 8, out: Path | None = None, console: Console | None = None,
             warn: Callable[[str], None] = lambda m: None) -> EvalOutcome:
    loaded = load_suite(suite_name)  # a bad suite fails before the model loads
    lm = load_language_model(path, ema=ema, batch_size=batch_size, warn=warn)
    dataset = dataset_of(Path(lm.source))
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=True) as bar:
        result = run_suite(lm, loaded, dataset, bar)
    root = out if out is not None else results_root(Path(lm.source))
    folder = write_results(result, root)
    comparisons, baseline_name = [], None
    if baseline is not None:
        baseline_folder = resolve_baseline(root, result.suite, baseline)
        baseline_name = baseline_folder.name
        comparisons = compare(read_items(folder), read_items(baseline_folder),
                              loaded.suite.regression)
        _record_comparison(folder, baseline_folder, comparisons)
    return EvalOutcome(result, folder, comparisons, baseline_name)


def results_root(source: Path) -> Path:
    """The run folder of a checkpoint (results are kept per run), else the model's folder."""
    return run_dir_of(source) or source


def dataset_of(source: Path) -> DatasetVersion | None:
    """The dataset version a checkpoint was trained on, if it is still in the workspace."""
    run_info = read_run_info(source)
    return run_dataset(results_root(source), run_info) if run_info else None


def resolve_baseline(root: Path, suite: str, baseline: str) -> Path:
    """A version folder under root/evals/<suite>/ (a unique prefix will do), or a path."""
    as_path = Path(baseline)
    if (as_path / RESULTS_FILE).is_file():
        return as_path
    versions = root / "evals" / suite
    matches = sorted(p for p in versions.glob(f"{baseline}*") if (p / RESULTS_FILE).is_file())
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(p.name for p in sorted(versions.glob("*")) if p.is_dir()) or "none"
    raise HeloxError(f"baseline {baseline!r}: {len(matches)} matching versions of suite "
                     f"{suite} in {versions}",
                     hint=f"name one of: {known}; or pass a folder holding {RESULTS_FILE}")


def _record_comparison(folder: Path, baseline_folder: Path, comparisons: list[Comparison]
                       ) -> None:
    record = {"baseline": str(baseline_folder), "comparisons": [
        {"task": c.task, "metric": c.metric, "baseline": c.baseline, "current": c.current,
         "change": c.change.as_dict(), "regression": c.regression} for c in comparisons]}
    (folder / "regression.json").write_text(json.dumps(record, indent=1, allow_nan=True))
