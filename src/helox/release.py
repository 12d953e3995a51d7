"""The main job's stages after training (a recipe's `release` section): evaluate → export →
parity → register → promote, each one line of progress and one line of result.

A stage that cannot go on raises (a refused promotion names its failing gates); what the
earlier stages wrote stays: results, exports, parity.json, the registered version.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.markup import escape

from helox.errors import HeloxError
from helox.eval.runner import evaluate
from helox.export.exporter import export_model, exports_folder
from helox.export.parity import parity_names, run_parity, write_report
from helox.platform import ReleaseConfig
from helox.registry.lineage import gather
from helox.registry.store import PromotionRefused, VersionInfo, open_registry


@dataclass
class ReleaseSummary:
    workspace: Path
    """Where the registry is (its platform.yaml, or the embedded SQLite store)."""
    eval_folder: Path | None = None
    eval_passed: bool | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    parity: Path | None = None
    parity_passed: bool | None = None
    registered: VersionInfo | None = None
    promoted_to: str | None = None

    def as_dict(self) -> dict:
        registered = self.registered
        return {"eval": {"results": str(self.eval_folder), "passed": self.eval_passed},
                "exports": {name: str(path) for name, path in self.exports.items()},
                "parity": {"report": str(self.parity) if self.parity else None,
                           "passed": self.parity_passed},
                "registered": registered.uri if registered else None,
                "promoted_to": self.promoted_to}


def release(config: ReleaseConfig, checkpoint: Path, workspace: Path, console: Console
            ) -> ReleaseSummary:
    summary = ReleaseSummary(Path(workspace))
    with _stage(console, f"evaluating on suite {config.suite}"):
        outcome = evaluate(checkpoint, config.suite, console=console)
        summary.eval_folder, summary.eval_passed = outcome.folder, outcome.passed
    _result(console, "eval", _eval_line(outcome))
    with _stage(console, f"exporting to {', '.join(config.exports)}"):
        for fmt in config.exports:
            exported = export_model(checkpoint, fmt, gguf_type=config.gguf_type, overwrite=True)
            summary.exports[fmt] = exported.artifact
    _result(console, "export", ", ".join(str(p) for p in summary.exports.values()))
    if config.parity:
        _parity(config, checkpoint, summary, console)
    if config.model_name is not None:
        _register(config, checkpoint, workspace, summary, console)
    return summary


def _parity(config: ReleaseConfig, checkpoint: Path, summary: ReleaseSummary,
            console: Console) -> None:
    names = parity_names(config.exports,
                         [config.gguf_type] if "gguf" in config.exports else None)
    with _stage(console, f"parity of {', '.join(names)} with the fp32 model"):
        report = run_parity(checkpoint, names)
        summary.parity = write_report(report, exports_folder(checkpoint, ema=False)
                                      / "parity.json")
        summary.parity_passed = report.passed
    rows = [f"{row.name} " + (f"skipped: {row.skipped}" if row.skipped else
                              f"ok ({_figures(row.figures)})" if row.passed else
                              "FAILED: " + "; ".join(row.failures))
            for row in report.rows if row.name not in ("batched", "train mode")]
    _result(console, "parity", ("passed" if report.passed else "FAILED") + ": "
            + ", ".join(rows) + f" ({summary.parity})")


def _register(config: ReleaseConfig, checkpoint: Path, workspace: Path,
              summary: ReleaseSummary, console: Console) -> None:
    with open_registry(workspace) as registry:
        with _stage(console, f"registering as {config.model_name} in {registry.uri}"):
            info = registry.register(gather(checkpoint), config.model_name)
            summary.registered = info
        _result(console, "register", f"{info.uri} (@dev)")
        if config.promote_to is None:
            return
        with _stage(console, f"promoting version {info.version} to {config.promote_to} "
                             f"through the gates"):
            try:
                change = registry.promote(info.name, info.version, config.promote_to)
            except PromotionRefused as refused:
                _result(console, "promote", f"refused: {escape(refused.message)}")
                raise
    summary.promoted_to = config.promote_to
    gates = change.gates.checks if change.gates else []
    _result(console, "promote", f"{info.name}@{config.promote_to} → version {info.version} "
                                f"({len(gates)} gates passed: "
                                f"{', '.join(c.name for c in gates)})")


def _figures(figures: dict[str, float]) -> str:
    return (f"mean KL {figures.get('mean_kl', float('nan')):.1e}, top-1 "
            f"{figures.get('top1_agreement', float('nan')):.3f}")


def _eval_line(outcome) -> str:
    metrics = []
    for task in outcome.result.tasks:
        for metric, estimate in task.metrics.items():
            if "." not in metric:  # the headline, not its per-domain parts
                metrics.append(f"{task.name}.{metric} {estimate.value:.3g} "
                               f"[{estimate.low:.3g}, {estimate.high:.3g}]")
    verdict = "passed" if outcome.passed else "FAILED: " + "; ".join(outcome.result.failures())
    return f"{verdict}: {', '.join(metrics)} ({outcome.folder})"


@contextmanager
def _stage(console: Console, doing: str) -> Iterator[None]:
    """One line saying what starts (kept, so a log shows it), a spinner while it runs."""
    started = time.perf_counter()
    console.print(f"[dim]…[/] {escape(doing)}", soft_wrap=True, highlight=False)
    with console.status(f"{doing} …"):
        try:
            yield
        except HeloxError:
            console.print(f"[red]✗[/] {escape(doing)} failed after "
                          f"{time.perf_counter() - started:.0f} s")
            raise


def _result(console: Console, stage: str, text: str) -> None:
    console.print(f"[green]✓[/] {stage:<9} {text}", soft_wrap=True, highlight=False)
