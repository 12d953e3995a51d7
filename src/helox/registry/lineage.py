"""What a model version is made of: the files registered as its artifacts and the lineage its
tags carry, gathered from a run or checkpoint folder.

A version's artifacts:

    model/                  a run folder holding the one checkpoint (weights, config,
                            tokenizer, run.json; no optimizer state), so a reader of the
                            registry loads it with `load_trained_model` like any run
    exports/<name>          every export of that checkpoint (`hf/`, `model-q8_0.gguf`,
                            `model.onnx`, `peft/`) with its signed manifest
    evals/<suite>/          results.json and items.jsonl of the checkpoint's newest evaluation
                            per suite (the promotion gates compare items, not summaries)
    parity.json             the checkpoint's parity report, when `helox parity` was run

A LoRA run's version is an adapter: its `exports/peft` is what a server loads on top of the
base, whose registered name, version and fingerprint the version's tags record.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from helox.checkpoint import load_trained_model, resolve_checkpoint
from helox.checkpoint.fingerprint import model_fingerprint
from helox.checkpoint.layout import (CHECKSUMS_FILE, CONFIG_FILE, OPTIMIZER_FILE, RUN_INFO_FILE,
                                     STATE_FILE, checkpoint_root, run_dir_of,
                                     step_of)
from helox.chat.templates import TEMPLATE_FILE
from helox.errors import HeloxError
from helox.eval.results import ITEMS_FILE, RESULTS_FILE
from helox.export.exporter import exports_folder
from helox.eval.stats import Estimate
from helox.export.manifest import MANIFEST_SUFFIX, manifest_path

TAG_PREFIX = "helox."
PARITY_FILE = "parity.json"
MODEL_ARTIFACT = "model"
EXPORTS_ARTIFACT = "exports"
EVALS_ARTIFACT = "evals"
NOT_SERVED = {OPTIMIZER_FILE, STATE_FILE}
"""Checkpoint files a registered model does not need: optimizer and loop state."""


@dataclass
class SuiteRecord:
    suite: str
    folder: Path
    """The evaluation's folder (results.json, items.jsonl)."""
    results: dict

    @property
    def passed(self) -> bool:
        return bool(self.results.get("passed"))


@dataclass
class Candidate:
    """A checkpoint about to become a model version."""

    checkpoint: Path
    model_fingerprint: str
    run_info: dict
    config: dict
    base_fingerprint: str | None
    """A LoRA run's base model; None for a full model."""
    exports: dict[str, Path] = field(default_factory=dict)
    """Artifact name (`hf`, `model-q8_0.gguf`, `peft`) → the export."""
    evals: dict[str, SuiteRecord] = field(default_factory=dict)
    parity: dict | None = None
    parent_fingerprint: str = ""
    """The model fingerprint of the checkpoint the run started from (`train.init_from`), as
    its exports' manifests record it; "" for a run from scratch."""

    @property
    def kind(self) -> str:
        return "adapter" if self.base_fingerprint else "model"

    def lineage_tags(self) -> dict[str, str]:
        info, train = self.run_info, self.config.get("train") or {}
        tags = {"kind": self.kind, "model_fingerprint": self.model_fingerprint,
                "run_fingerprint": info.get("fingerprint", ""),
                "dataset_version": info.get("dataset_version", ""),
                "config_sha256": info.get("config_sha256", ""),
                "parent_model": str(info.get("parent_model") or train.get("init_from") or ""),
                "parent_model_fingerprint": self.parent_fingerprint,
                "checkpoint": str(self.checkpoint), "step": str(step_of(self.checkpoint)),
                "exports": ",".join(sorted(self.exports))}
        if self.base_fingerprint:
            tags["base.model_fingerprint"] = self.base_fingerprint
        tags.update(eval_tags(self.evals))
        tags.update(parity_tags(self.parity))
        return {TAG_PREFIX + key: value for key, value in tags.items()}


def gather(model: Path, warn=lambda message: None) -> Candidate:
    """The checkpoint of `model` (a run folder's newest valid one, or a checkpoint folder),
    its fingerprint, exports, evaluations and parity report."""
    checkpoint = resolve_checkpoint(Path(model), warn)
    trained = load_trained_model(checkpoint)
    candidate = Candidate(
        checkpoint=checkpoint, model_fingerprint=model_fingerprint(trained.model),
        run_info=trained.run_info, config=trained.config,
        base_fingerprint=trained.adapter.base_fingerprint if trained.adapter else None)
    folder = exports_folder(checkpoint, ema=False)
    candidate.exports = find_exports(folder)
    candidate.parent_fingerprint = _manifest_metadata(candidate.exports).get(
        "helox.parent_model_fingerprint", "")
    parity = folder / PARITY_FILE
    candidate.parity = json.loads(parity.read_text()) if parity.is_file() else None
    version = f"{checkpoint.name}-{trained.weights_digest()}"
    candidate.evals = find_evals(run_dir_of(checkpoint) or checkpoint, version)
    _check_servable(candidate, folder)
    return candidate


def find_exports(folder: Path) -> dict[str, Path]:
    """Every export with a manifest in a checkpoint's exports folder."""
    if not folder.is_dir():
        return {}
    return {path.name: path for path in sorted(folder.iterdir())
            if path.name != PARITY_FILE and not path.name.endswith(MANIFEST_SUFFIX)
            and manifest_path(path).is_file()}


def _manifest_metadata(exports: dict[str, Path]) -> dict[str, str]:
    """The training metadata every export's manifest carries (the same for all of them)."""
    for path in exports.values():
        return json.loads(manifest_path(path).read_text()).get("metadata", {})
    return {}


def find_evals(root: Path, model_version: str) -> dict[str, SuiteRecord]:
    """ROOT/evals/<suite>/<model version>/: the evaluations of exactly these weights."""
    found = {}
    for results in sorted((Path(root) / "evals").glob(f"*/{model_version}/{RESULTS_FILE}")):
        if (results.parent / ITEMS_FILE).is_file():
            suite = results.parent.parent.name
            found[suite] = SuiteRecord(suite, results.parent, json.loads(results.read_text()))
    return found


def _check_servable(candidate: Candidate, folder: Path) -> None:
    if candidate.kind == "adapter" and "peft" not in candidate.exports:
        raise HeloxError(f"{candidate.checkpoint} is a LoRA run's checkpoint with no PEFT "
                         f"export in {folder}, which is what a server loads on its base",
                         hint=f"helox export {candidate.checkpoint} --format peft")
    if not candidate.exports:
        raise HeloxError(f"{candidate.checkpoint} has no exports in {folder}: a registered "
                         f"version carries its exported files",
                         hint=f"helox export {candidate.checkpoint} --format hf (and gguf, "
                              f"onnx), then register again")


def eval_tags(evals: dict[str, SuiteRecord]) -> dict[str, str]:
    """`eval.<suite>`: passed/failed; `eval.<suite>.<task>.<metric>`: value [low, high] n."""
    tags = {}
    for suite, record in evals.items():
        tags[f"eval.{suite}"] = "passed" if record.passed else "failed"
        for task, result in record.results.get("tasks", {}).items():
            for metric, estimate in result.get("metrics", {}).items():
                tags[f"eval.{suite}.{task}.{metric}"] = describe_estimate(estimate)
    return tags


def describe_estimate(record: dict) -> str:
    estimate = Estimate.from_dict(record)
    return f"{estimate.value:.4g} [{estimate.low:.4g}, {estimate.high:.4g}] n={estimate.n}"


def parity_tags(parity: dict | None) -> dict[str, str]:
    """`parity`: passed/failed; `parity.<row>`: its figures, and what failed."""
    if parity is None:
        return {}
    tags = {"parity": "passed" if parity.get("passed") else "failed"}
    for row in parity.get("rows", []):
        figures = " ".join(f"{k}={v:.3g}" for k, v in row.get("figures", {}).items())
        verdict = ("skipped: " + row["skipped"] if row.get("skipped") else
                   "failed: " + "; ".join(row["failures"]) if row.get("failures") else "ok")
        tags[f"parity.{row['name'].replace(' ', '-')}"] = f"{verdict} {figures}".strip()
    return tags


def stage_artifacts(candidate: Candidate, out: Path) -> Path:
    """Lay out the version's artifacts in `out` (see the module docstring)."""
    run_copy = out / MODEL_ARTIFACT
    _copy_checkpoint(candidate.checkpoint, run_copy)
    for name, path in candidate.exports.items():
        _copy(path, out / EXPORTS_ARTIFACT / name)
        if path.is_file():  # a folder's manifest is inside it
            _copy(manifest_path(path), out / EXPORTS_ARTIFACT / manifest_path(path).name)
    for suite, record in candidate.evals.items():
        for file in (RESULTS_FILE, ITEMS_FILE):
            _copy(record.folder / file, out / EVALS_ARTIFACT / suite / file)
    if candidate.parity is not None:
        (out / PARITY_FILE).write_text(json.dumps(candidate.parity, indent=1) + "\n")
    return out


def _copy_checkpoint(checkpoint: Path, run_copy: Path) -> None:
    """The checkpoint as a one-checkpoint run folder, without what only training needs."""
    target = checkpoint_root(run_copy) / checkpoint.name
    target.mkdir(parents=True)
    for file in checkpoint.iterdir():
        if file.name not in NOT_SERVED | {CHECKSUMS_FILE}:
            _copy(file, target / file.name)
    checksums = json.loads((checkpoint / CHECKSUMS_FILE).read_text())  # what stays verifiable
    (target / CHECKSUMS_FILE).write_text(json.dumps(
        {name: digest for name, digest in checksums.items() if name not in NOT_SERVED},
        indent=1))
    run_dir = run_dir_of(checkpoint)
    for name in (CONFIG_FILE, RUN_INFO_FILE, TEMPLATE_FILE):
        source = (run_dir / name) if run_dir else None
        if source is not None and source.is_file():
            _copy(source, run_copy / name)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)
