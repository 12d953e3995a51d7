"""Metrics of scored items, their bootstrap intervals, thresholds, storage per model version,
and regression against a baseline version.

Two kinds of metric, each a function of item rows:
- `accuracy`: the mean score (higher is better);
- `ppl`: exp(summed NLL / summed tokens) over the rows (lower is better).
Every task reports its metric over all its clean rows, and per group (`accuracy.len200.depth0.5`,
`ppl.drama`). Rows of contaminated items are left out of those and reported apart
(`accuracy.contaminated`), so a threshold is never met thanks to leaked items.

Regression is paired: both versions scored the same items, so the bootstrap resamples items
and recomputes both metrics on the same resample; a drop is flagged when its whole interval
lies on the worse side of 0 and the drop is beyond the suite's tolerance.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helox.eval.stats import BOOTSTRAP_RESAMPLES, CONFIDENCE, Estimate, _quantiles
from helox.eval.suite import Bound, RegressionConfig
from helox.eval.tasks import ItemRow

RESULTS_FILE = "results.json"
ITEMS_FILE = "items.jsonl"


def metric_value(kind: str, rows: list[dict]) -> float:
    if not rows:
        return float("nan")
    if kind == "accuracy":
        return float(np.mean([r["score"] for r in rows]))
    tokens = sum(r["tokens"] for r in rows)
    return float(np.exp(sum(r["nll"] for r in rows) / tokens)) if tokens else float("nan")


def higher_is_better(metric: str) -> bool:
    return metric.split(".")[0] == "accuracy"


def metric_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Metric name -> the rows it is computed over (clean rows, then per group, then the
    contaminated ones)."""
    if not rows:
        return {}
    kind = "accuracy" if "score" in rows[0] else "ppl"  # scored items, else perplexity rows
    clean = [r for r in rows if not r["contaminated"]]
    metrics = {kind: clean}
    for group in sorted({r["group"] for r in clean if r.get("group") is not None}):
        metrics[f"{kind}.{group}"] = [r for r in clean if r.get("group") == group]
    dirty = [r for r in rows if r["contaminated"]]
    if dirty:
        metrics[f"{kind}.contaminated"] = dirty
    return metrics


def estimate(metric: str, rows: list[dict], seed: int = 0) -> Estimate:
    kind = metric.split(".")[0]
    value = metric_value(kind, rows)
    if not rows:
        return Estimate(value, float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    samples = [metric_value(kind, [rows[i] for i in rng.integers(0, len(rows), len(rows))])
               for _ in range(BOOTSTRAP_RESAMPLES)]
    low, high = _quantiles(np.array(samples), CONFIDENCE)
    return Estimate(value, low, high, len(rows))


@dataclass
class TaskResult:
    name: str
    type: str
    metrics: dict[str, Estimate]
    thresholds: dict[str, Bound]
    contaminated_items: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        failed = []
        for metric, bound in self.thresholds.items():
            est = self.metrics.get(metric)
            if est is None or not np.isfinite(est.value) or not bound.passes(est.value):
                value = "missing" if est is None else f"{est.value:.4g}"
                failed.append(f"{self.name}.{metric} = {value}, needs {bound.describe()}")
        return failed

    def as_dict(self) -> dict:
        return {"type": self.type,
                "metrics": {m: {**e.as_dict(), "higher_is_better": higher_is_better(m)}
                            for m, e in self.metrics.items()},
                "thresholds": {m: {**b.model_dump(exclude_none=True),
                                   "passed": not any(f.startswith(f"{self.name}.{m} ")
                                                     for f in self.failures())}
                               for m, b in self.thresholds.items()},
                "contaminated_items": self.contaminated_items}


def task_result(name: str, task_type: str, rows: list[ItemRow], thresholds: dict[str, Bound]
                ) -> TaskResult:
    records = [r.as_dict() for r in rows]
    metrics = {m: estimate(m, chosen) for m, chosen in metric_rows(records).items()}
    return TaskResult(name, task_type, metrics, thresholds,
                      [r.id for r in rows if r.contaminated])


@dataclass
class SuiteResult:
    suite: str
    suite_sha256: str
    model_version: str
    model_source: str
    tasks: list[TaskResult]
    rows: list[ItemRow]
    contamination: dict
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc)
                            .isoformat(timespec="seconds"))

    def failures(self) -> list[str]:
        return [f for task in self.tasks for f in task.failures()]

    def as_dict(self) -> dict:
        return {"suite": self.suite, "suite_sha256": self.suite_sha256,
                "model": {"version": self.model_version, "source": self.model_source},
                "created_at": self.created_at, "passed": not self.failures(),
                "failures": self.failures(), "contamination": self.contamination,
                "tasks": {t.name: t.as_dict() for t in self.tasks}}


def write_results(result: SuiteResult, root: Path) -> Path:
    """root/evals/<suite>/<model version>/{results.json, items.jsonl}; returns the folder."""
    folder = Path(root) / "evals" / result.suite / result.model_version
    folder.mkdir(parents=True, exist_ok=True)
    items = "".join(json.dumps(r.as_dict(), allow_nan=True) + "\n" for r in result.rows)
    (folder / ITEMS_FILE).write_text(items, encoding="utf-8")
    (folder / RESULTS_FILE).write_text(json.dumps(result.as_dict(), indent=1, allow_nan=True),
                                       encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------
# Regression


@dataclass(frozen=True)
class Comparison:
    task: str
    metric: str
    baseline: float
    current: float
    change: Estimate
    """current − baseline for accuracies; log(current / baseline) for perplexities; paired
    bootstrap interval."""
    regression: bool
    items: int


def read_items(folder: Path) -> list[dict]:
    path = Path(folder) / ITEMS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def compare(current: list[dict], baseline: list[dict], tolerance: RegressionConfig,
            seed: int = 0) -> list[Comparison]:
    """Every metric both versions have, over the items both scored (paired by task and id)."""
    base = {(r["task"], str(r["id"])): r for r in baseline}
    comparisons = []
    for task in sorted({r["task"] for r in current}):
        pairs = [(r, base[(task, str(r["id"]))]) for r in current
                 if r["task"] == task and (task, str(r["id"])) in base]
        if not pairs:
            continue
        cur_metrics = metric_rows([c for c, _ in pairs])
        for metric, chosen in cur_metrics.items():
            if metric.endswith(".contaminated"):
                continue
            ids = {str(r["id"]) for r in chosen}
            paired = [(c, b) for c, b in pairs if str(c["id"]) in ids]
            comparisons.append(_compare_metric(task, metric, paired, tolerance, seed))
    return comparisons


def _compare_metric(task: str, metric: str, paired: list[tuple[dict, dict]],
                    tolerance: RegressionConfig, seed: int) -> Comparison:
    kind = metric.split(".")[0]
    current = metric_value(kind, [c for c, _ in paired])
    baseline = metric_value(kind, [b for _, b in paired])

    def change(indices) -> float:
        cur = metric_value(kind, [paired[i][0] for i in indices])
        base = metric_value(kind, [paired[i][1] for i in indices])
        return cur - base if kind == "accuracy" else float(np.log(cur / base))

    rng = np.random.default_rng(seed)
    n = len(paired)
    samples = np.array([change(rng.integers(0, n, n)) for _ in range(BOOTSTRAP_RESAMPLES)])
    low, high = _quantiles(samples, CONFIDENCE)
    observed = change(np.arange(n))
    if kind == "accuracy":
        regression = high < 0 and -observed > tolerance.max_accuracy_drop
    else:
        regression = low > 0 and np.expm1(observed) > tolerance.max_ppl_increase
    return Comparison(task, metric, baseline, current, Estimate(observed, low, high, n),
                      bool(regression), n)
