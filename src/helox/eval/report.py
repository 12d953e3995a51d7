"""What `helox eval` prints: one table of metrics with their intervals and thresholds, the
contamination check, and the comparison with a baseline."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from helox.eval.runner import EvalOutcome


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def metrics_table(outcome: EvalOutcome) -> Table:
    result = outcome.result
    table = Table(title=f"suite {result.suite} · model {result.model_version}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column, justify in (("task", "left"), ("metric", "left"), ("value", "right"),
                            ("95% interval", "right"), ("n", "right"), ("gate", "left")):
        table.add_column(column, justify=justify, no_wrap=True)
    for task in result.tasks:
        for metric, est in task.metrics.items():
            bound = task.thresholds.get(metric)
            gate = "" if bound is None else bound.describe() + (
                " [green]pass[/]" if math.isfinite(est.value) and bound.passes(est.value)
                else " [bold red]FAIL[/]")
            table.add_row(task.name, metric, _number(est.value),
                          f"[{_number(est.low)}, {_number(est.high)}]", str(est.n), gate)
    return table


def regression_table(outcome: EvalOutcome) -> Table:
    table = Table(title=f"against baseline {outcome.baseline}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("task", "metric", "baseline", "current", "change [95%]", ""):
        table.add_column(column, justify="left" if column in ("task", "metric", "") else "right",
                         no_wrap=True)
    for c in outcome.comparisons:
        if c.metric.startswith("accuracy"):
            change = f"{c.change.value:+.3f} [{c.change.low:+.3f}, {c.change.high:+.3f}]"
        else:  # a log ratio: shown as a relative change
            low, value, high = (math.expm1(x) for x in (c.change.low, c.change.value,
                                                         c.change.high))
            change = f"{value:+.1%} [{low:+.1%}, {high:+.1%}]"
        table.add_row(c.task, c.metric, _number(c.baseline), _number(c.current), change,
                      "[bold red]REGRESSION[/]" if c.regression else "")
    return table


def print_outcome(console: Console, outcome: EvalOutcome) -> None:
    console.print(metrics_table(outcome))
    contamination = outcome.result.contamination
    if contamination.get("checked"):
        flagged = contamination["contaminated"]
        console.print(f"contamination: {contamination['items_checked']} items checked against "
                      f"the training data of dataset {contamination['dataset_version']} "
                      f"({contamination['ngram_words']}-word n-grams): "
                      + (f"{len(flagged)} found, scored apart: {', '.join(flagged)}" if flagged
                         else "none found"), markup=False, soft_wrap=True)
    else:
        console.print(f"contamination: not checked ({contamination.get('reason')})",
                      markup=False)
    if outcome.comparisons:
        console.print(regression_table(outcome))
    for failure in outcome.result.failures():
        console.print(f"[bold red]threshold failed:[/] {escape(failure)}")
    for c in outcome.regressions:
        console.print(f"[bold red]regression:[/] {escape(c.task)}.{escape(c.metric)} "
                      f"{_number(c.baseline)} → {_number(c.current)}")
    verdict = "[green]passed[/]" if outcome.passed else "[bold red]failed[/]"
    console.print(f"{verdict}; results: {escape(str(outcome.folder))}")
