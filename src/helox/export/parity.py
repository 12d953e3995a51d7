"""`helox parity`: every export loaded by its own runtime and compared with the training model
in fp32 on a fixed prompt set, with per-format thresholds; and the model's own consistency
(train mode against eval mode, one sequence against a padded batch).

Figures, over every position of every prompt (logits of the next token):
- max |Δlogit|: the largest absolute difference of a logit;
- mean KL: KL(reference ‖ candidate) of the next-token distributions, averaged over positions;
- top-1 agreement: the share of positions where both pick the same most likely token;
- perplexity Δ: the candidate's perplexity on the prompts' own next tokens against the
  reference's, in percent.
"""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from rich.table import Table

from helox.errors import HeloxError
from helox.export.exporter import export_model
from helox.export.hf import require_transformers
from helox.export.onnx import OnnxRunner
from helox.export.source import ExportSource, load_export_source

PARITY_PROMPTS = (
    "In the beginning God created the heaven and the earth. And the earth was without form, "
    "and void; and darkness was upon the face of the deep.",
    "ROMEO. But soft, what light through yonder window breaks?\nJULIET. Ay me!",
    "def read_config(path):\n    \"\"\"Return the parsed YAML at path.\"\"\"\n    with "
    "open(path) as f:\n        return yaml.safe_load(f)\n",
    "The committee met on 14 March 1998, at 10:30; twelve of its 15 members were present.",
    "  Indented   text,\tcafé naïve — 東京 ok?! 3.14159",
    "Return the number of items, or -1 when the list is empty.",
)
"""Scripture, drama, code, numbers and unicode: what the bundled corpus and its tokenizer
cover, and what a wrong tokenizer, permutation or quantisation shows up on."""

FIGURES = ("max_abs_logit", "mean_kl", "top1_agreement", "ppl_delta_pct")

THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"max_abs_logit": 1e-3, "mean_kl": 1e-8, "top1_agreement": 0.99,
             "ppl_delta_pct": 0.01},
    "F16": {"max_abs_logit": 0.25, "mean_kl": 1e-4, "top1_agreement": 0.98,
            "ppl_delta_pct": 0.5},
    "Q8_0": {"mean_kl": 0.02, "top1_agreement": 0.90, "ppl_delta_pct": 5.0},
    "Q4_0": {"mean_kl": 0.1, "top1_agreement": 0.75, "ppl_delta_pct": 25.0},
}
"""What counts as parity with the fp32 model, per precision. fp32 rows (transformers,
onnxruntime, GGUF F32, and the model against itself) differ only in summation order; F16
rounds weights and activations; Q8_0 and Q4_0 quantize weights in blocks of 32, and llama.cpp
quantizes activations to 8 bits for them, so their error depends on the model: they are gated
on the distributions (KL, top-1, perplexity), not on the largest single logit. Measured
(max |Δlogit| / mean KL / top-1 / ppl Δ%), llama-cpp-python 0.3.36 on the CPU:
- the tests' tiny model (d_model 64, 2 layers): fp32 1.9e-6 / 2e-14; F16 6.6e-4 / 3.7e-9 /
  1.00; Q8_0 1.3e-2 / 1.7e-6 / 1.00; Q4_0 0.37 / 7.8e-5 / 0.94;
- the quickstart model (d_model 256, 4 layers): fp32 9.5e-6 / 7.5e-13; F16 6.1e-3 / 1.1e-7 /
  1.00 / -0.001; Q8_0 0.13 / 8.0e-5 / 1.00 / -0.04; Q4_0 0.62 / 2.4e-3 / 0.95 / -0.9;
- SmolLM2-135M (imported from a Q4_1 GGUF): fp32 1.2e-4 / 2e-11; F16 7.2e-2 / 9.2e-6 / 1.00 /
  +0.09; Q8_0 3.9 / 9.1e-3 / 0.94 / +2.7; Q4_0 29.8 / 0.52 / 0.63 / +44.

SmolLM2's quantization error is the model's, not the writer's: llama.cpp's own quantizer
(llama_model_quantize on the F16 export) gives the same figures (Q8_0 KL 9.0e-3, Q4_0 KL 0.51;
tests/export/test_gguf.py checks ours against it). Q4_0 of that model fails these thresholds,
rightly: it picks another next token at a third of the positions.
"""


def thresholds_for(name: str) -> dict[str, float]:
    """The limits of a row: GGUF rows those of their tensor type, every other row fp32's."""
    if name.startswith("gguf ") and name.split()[1] in THRESHOLDS:
        return THRESHOLDS[name.split()[1]]
    return THRESHOLDS["fp32"]


@dataclass
class ParityRow:
    name: str
    """What was compared: "hf", "onnx", "gguf Q8_0", "batched", "train mode"."""
    runtime: str
    figures: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    artifact: str = ""
    skipped: str = ""
    """Why the row was not measured (its runtime is missing); a skipped row does not fail."""

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    model: str
    prompts: int
    tokens: int
    rows: list[ParityRow]

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    def as_dict(self) -> dict:
        return {"model": self.model, "prompts": self.prompts, "tokens": self.tokens,
                "passed": self.passed, "rows": [asdict(row) for row in self.rows]}


# ---------------------------------------------------------------------------------------------
# Figures


def log_softmax(logits_TV: np.ndarray) -> np.ndarray:
    shifted_TV = logits_TV - logits_TV.max(axis=-1, keepdims=True)
    return shifted_TV - np.log(np.exp(shifted_TV).sum(axis=-1, keepdims=True))


def parity_figures(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray],
                   prompts_ids: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """The four figures over all prompts; each array is one prompt's (T, V) logits. Without
    the prompts' ids there is no perplexity, so no ppl_delta_pct."""
    abs_diffs, kls, agreements, ref_nll, cand_nll = [], [], [], [], []
    for i, (ref_TV, cand_TV) in enumerate(zip(reference, candidate)):
        if ref_TV.shape != cand_TV.shape:
            raise HeloxError(f"logits of shape {cand_TV.shape} cannot be compared with "
                             f"{ref_TV.shape}", hint="the export's vocabulary or context "
                                                     "differs from the model's: export again")
        ref_TV, cand_TV = ref_TV.astype(np.float64), cand_TV.astype(np.float64)
        ref_logp_TV, cand_logp_TV = log_softmax(ref_TV), log_softmax(cand_TV)
        abs_diffs.append(np.abs(ref_TV - cand_TV).max())
        kls.append((np.exp(ref_logp_TV) * (ref_logp_TV - cand_logp_TV)).sum(axis=-1))
        agreements.append(ref_TV.argmax(-1) == cand_TV.argmax(-1))
        if prompts_ids is not None:
            targets = np.asarray(prompts_ids[i][1:])
            positions = np.arange(len(targets))
            ref_nll.append(-ref_logp_TV[positions, targets])
            cand_nll.append(-cand_logp_TV[positions, targets])
    figures = {"max_abs_logit": float(max(abs_diffs)),
               "mean_kl": float(np.concatenate(kls).mean()),
               "top1_agreement": float(np.concatenate(agreements).mean())}
    if prompts_ids is not None:
        ref_ppl = math.exp(np.concatenate(ref_nll).mean())
        cand_ppl = math.exp(np.concatenate(cand_nll).mean())
        figures["ppl_delta_pct"] = 100.0 * (cand_ppl / ref_ppl - 1.0)
    return figures


def threshold_failures(figures: dict[str, float], limits: dict[str, float]) -> list[str]:
    """Each figure outside its limit, as text (a figure or limit that is absent is skipped)."""
    def has(key: str) -> bool:
        return key in limits and key in figures

    failures = [f"{key} {figures[key]:.3g} > {limits[key]:.3g}"
                for key in ("max_abs_logit", "mean_kl") if has(key)
                and figures[key] > limits[key]]
    if has("top1_agreement") and figures["top1_agreement"] < limits["top1_agreement"]:
        failures.append(f"top1_agreement {figures['top1_agreement']:.4f} < "
                        f"{limits['top1_agreement']:.4f}")
    if has("ppl_delta_pct") and abs(figures["ppl_delta_pct"]) > limits["ppl_delta_pct"]:
        failures.append(f"|ppl_delta_pct| {abs(figures['ppl_delta_pct']):.3g} > "
                        f"{limits['ppl_delta_pct']:.3g}")
    return failures


# ---------------------------------------------------------------------------------------------
# Runtimes: each maps the prompts' ids to one (T, V) float32 array per prompt


Logits = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


def helox_logits(model: torch.nn.Module) -> Logits:
    def run(prompts_ids):
        with torch.no_grad():
            return [model(torch.tensor([ids]))[0].float().numpy() for ids in prompts_ids]
    return run


def batched_logits(model: torch.nn.Module, pad_id: int) -> Logits:
    """All prompts in one right-padded batch; each row read at its real positions only (causal
    attention: padding after a token cannot change its logits)."""
    def run(prompts_ids):
        width = max(len(ids) for ids in prompts_ids)
        rows = [list(ids) + [pad_id] * (width - len(ids)) for ids in prompts_ids]
        with torch.no_grad():
            logits_BTV = model(torch.tensor(rows)).float().numpy()
        return [logits_BTV[i, :len(ids)] for i, ids in enumerate(prompts_ids)]
    return run


def train_mode_logits(model: torch.nn.Module) -> Logits:
    """The forward in train mode (no gradient): with no dropout in the model it must equal
    eval mode; a module that behaves differently in training would show here."""
    forward = helox_logits(model)

    def run(prompts_ids):
        was_training = model.training
        model.train()
        try:
            return forward(prompts_ids)
        finally:
            model.train(was_training)
    return run


def transformers_logits(folder: Path) -> Logits:
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar, per load
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32).eval()

    def run(prompts_ids):
        with torch.no_grad():
            return [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts_ids]
    return run


def onnxruntime_logits(path: Path) -> Logits:
    runner = OnnxRunner(path)
    return lambda prompts_ids: [runner.logits(np.array([ids]))[0] for ids in prompts_ids]


def llama_cpp_logits(path: Path) -> Logits:
    from helox.export.gguf import LlamaCppRunner  # optional extra: gguf

    def run(prompts_ids):
        with LlamaCppRunner(path) as runner:
            return [runner.logits(ids) for ids in prompts_ids]
    return run


RUNTIMES = {"hf": "transformers", "onnx": "onnxruntime", "gguf": "llama.cpp"}
PARITY_FORMATS = ("hf", "onnx", "gguf")
GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
DEFAULT_FORMATS = ("hf", "onnx", *(f"gguf {t}" for t in GGUF_TYPES))


def parity_names(formats: Sequence[str] | None, gguf_types: Sequence[str] | None) -> list[str]:
    """The comparisons of `--format` (hf, onnx, gguf) and `--type` (gguf's tensor types), in
    helox export's vocabulary: `--format gguf --type Q8_0` is the row "gguf Q8_0"."""
    formats = [f.lower() for f in formats] if formats else list(PARITY_FORMATS)
    types = [t.upper() for t in gguf_types] if gguf_types else list(GGUF_TYPES)
    unknown = [f for f in formats if f not in PARITY_FORMATS] + \
        [t for t in types if t not in GGUF_TYPES]
    if unknown:
        raise HeloxError(f"unknown parity format or type: {', '.join(unknown)}",
                         hint=f"--format takes {', '.join(PARITY_FORMATS)}; --type takes "
                              f"{', '.join(GGUF_TYPES)}")
    if gguf_types and "gguf" not in formats:
        raise HeloxError("--type applies to gguf, which is not among the formats",
                         hint="add --format gguf, or drop --type")
    return [name for fmt in formats
            for name in ([f"gguf {t}" for t in types] if fmt == "gguf" else [fmt])]


def missing_runtime(fmt: str) -> str:
    """Why a format's runtime cannot run here ("" when it can)."""
    module = {"hf": "transformers", "onnx": "onnxruntime", "gguf": "llama_cpp"}[fmt]
    if importlib.util.find_spec(module) is None:
        package = {"llama_cpp": "llama-cpp-python"}.get(module, module)
        return f"{package} is not installed (pip install {package})"
    return ""


# ---------------------------------------------------------------------------------------------
# The report


def prompt_ids(source: ExportSource, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as the model reads a document: after EOS, cut to the context."""
    limit = source.model.cfg.max_seq_len
    return [[source.eos_id, *source.tokenizer.encode(text, add_special_tokens=False).ids][:limit]
            for text in prompts]


def measure(name: str, runtime: str, run: Logits, reference: list[np.ndarray],
            prompts_ids: list[list[int]], artifact: str = "") -> ParityRow:
    started = time.perf_counter()
    figures = parity_figures(reference, run(prompts_ids), prompts_ids)
    limits = thresholds_for(name)
    return ParityRow(name, runtime, figures, limits, threshold_failures(figures, limits),
                     time.perf_counter() - started, artifact)


def run_parity(model: Path, formats: Sequence[str] = DEFAULT_FORMATS,
               prompts: Sequence[str] = PARITY_PROMPTS, out: Path | None = None,
               key: Path | None = None, ema: bool = False,
               progress: Callable[[str], None] = lambda message: None) -> ParityReport:
    """Export the model to every format in `formats` (under `out`, default a temporary
    folder), run each in its runtime on `prompts`, compare with the fp32 model."""
    source = load_export_source(model, ema=ema, warn=progress)
    ids = prompt_ids(source, prompts)
    reference = helox_logits(source.model)(ids)
    rows = [measure("batched", "helox", batched_logits(source.model, source.eos_id),
                    reference, ids),
            measure("train mode", "helox", train_mode_logits(source.model), reference, ids)]
    unknown = [name for name in formats if name not in DEFAULT_FORMATS]
    if unknown:
        raise HeloxError(f"unknown parity format(s): {', '.join(unknown)}",
                         hint=f"choose among: {', '.join(DEFAULT_FORMATS)}")
    with tempfile.TemporaryDirectory(prefix="helox-parity-") as scratch:
        folder = Path(out) if out is not None else Path(scratch)
        for name in formats:
            fmt, _, tensor_type = name.partition(" ")
            skipped = missing_runtime(fmt)
            if skipped:
                rows.append(ParityRow(name, RUNTIMES[fmt], skipped=skipped))
                progress(f"{name}: skipped: {skipped}")
                continue
            progress(f"{name}: exporting and running in {RUNTIMES[fmt]}")
            target = folder / {"hf": "hf", "onnx": "model.onnx"}.get(
                fmt, f"model-{tensor_type.lower()}.gguf")
            exported = export_model(model, fmt, target, gguf_type=tensor_type or "F16",
                                    overwrite=True, key=key, source=source)
            run = {"hf": transformers_logits, "onnx": onnxruntime_logits,
                   "gguf": llama_cpp_logits}[fmt](exported.artifact)
            rows.append(measure(name, RUNTIMES[fmt], run, reference, ids,
                                str(exported.artifact) if out is not None else ""))
    return ParityReport(str(source.checkpoint), len(ids), sum(map(len, ids)), rows)


def write_report(report: ParityReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return path


def parity_table(report: ParityReport):
    """One row per comparison: its figures, then its limits in the same order."""
    table = Table(title=f"parity with the fp32 model · {report.model} · {report.prompts} "
                        f"prompts, {report.tokens} tokens", title_justify="left")
    for column in ("export", "runtime", "max |Δlogit|", "mean KL", "top-1", "ppl Δ %",
                   "limits", "result"):
        table.add_column(column, justify="left" if column in ("export", "runtime", "limits",
                                                               "result") else "right")
    for row in report.rows:
        if row.skipped:
            table.add_row(row.name, row.runtime, "", "", "", "", "", f"skipped: {row.skipped}")
            continue
        f, t = row.figures, row.thresholds
        limits = " ".join(f"{label}{t[key]:g}" for key, label in (
            ("max_abs_logit", "Δ≤"), ("mean_kl", "KL≤"), ("top1_agreement", "top1≥"),
            ("ppl_delta_pct", "ppl±")) if key in t)
        table.add_row(row.name, row.runtime, f"{f['max_abs_logit']:.2e}",
                      f"{f['mean_kl']:.1e}", f"{f['top1_agreement']:.3f}",
                      f"{f['ppl_delta_pct']:+.3f}", limits,
                      "[green]ok[/]" if row.passed else
                      "[red]FAILED: " + "; ".join(row.failures) + "[/]")
    return table
