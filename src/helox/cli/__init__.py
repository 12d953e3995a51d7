"""The `helox` command. Each subcommand is a thin shell around one library function.

Results go to stdout (with `--json`, as one JSON document); progress, warnings and errors go
to stderr, so `helox eval MODEL --json | jq` works. MODEL is always the same argument: a run
folder (its newest valid checkpoint), one checkpoint folder, or, where a command reads them,
an exported Hugging Face folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.markup import escape

from helox.cli.common import (AnyModelArg, EmaOpt, JsonOpt, ModelArg, RecipeArg, RunDirOpt,
                              SetOpt, WorkspaceOpt, console, emit, out, warn)
from helox.cli.events import events_app
from helox.cli.registry import registry_app
from helox.cli.serve import serve
from helox.errors import HeloxError

if TYPE_CHECKING:
    from helox.config import RunConfig

app = typer.Typer(
    help="Helox: raw text to a trained, evaluated, exported model.\n\n"
         "Example: helox run quickstart",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich",
    add_completion=False,
)
data_app = typer.Typer(help="Build, inspect, verify and govern datasets (access and audit)."
                            "\n\nExample: helox data prepare quickstart",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
provenance_app = typer.Typer(help="Signing keys, and checks of exported artifacts.\n\n"
                                  "Example: helox provenance verify RUN_DIR/exports/"
                                  "step-00000420/hf", no_args_is_help=True)
app.add_typer(provenance_app, name="provenance")

checkpoint_app = typer.Typer(help="Checkpoints of a run.\n\nExample: helox checkpoint "
                                    "consolidate workspace/runs/quickstart", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")
app.add_typer(registry_app, name="registry")
app.add_typer(events_app, name="events")
app.command()(serve)

def _load(recipe: Path, sets: list[str] | None) -> RunConfig:
    from helox.api import load_config

    return load_config(recipe, sets or [])


@app.command()
def run(recipe: RecipeArg, set_: SetOpt = None, run_dir: RunDirOpt = None,
        as_json: JsonOpt = False) -> None:
    """Run the whole job: prepare data, train (resuming if possible), sample, print artifacts.

    Example: helox run quickstart --set train.max_steps=200
    """
    from helox.run import default_run_dir, print_summary, run_recipe

    config = _load(recipe, set_)
    summary = run_recipe(config, run_dir or default_run_dir(config), console)
    if summary is not None:  # None: stopped by a signal after a checkpoint
        emit(as_json, summary.as_dict(), lambda: print_summary(out, summary))


# ---------------------------------------------------------------------------------------------
# data


VersionArg = Annotated[str, typer.Argument(help="Dataset version id (or a unique prefix).")]


def _dataset_record(dataset) -> dict:
    return {"version": dataset.version, "name": dataset.name, "path": dataset.path,
            "splits": dataset.manifest["splits"], "lineage": dataset.lineage,
            "report": dataset.report}


@data_app.command("prepare")
def data_prepare(recipe: RecipeArg, set_: SetOpt = None,
                 workers: Annotated[Optional[int], typer.Option(
                     min=1, help="Processes for the per-document steps (data.num_workers); "
                                 "the dataset is the same for any number.")] = None,
                 as_json: JsonOpt = False) -> None:
    """Read, clean (data.pipeline), tokenize and shard the recipe's sources; print the report
    and the dataset version.

    Trains the BPE tokenizer unless tokenizer.path names one. Prepared versions are cached by
    their inputs, so running it twice builds once.

    Example: helox data prepare quickstart --workers 2
    """
    from helox.data.report import print_report
    from helox.run import prepare_with_progress

    overrides = (set_ or []) + ([f"data.num_workers={workers}"] if workers else [])
    dataset = prepare_with_progress(_load(recipe, overrides), console)

    def show() -> None:
        print_report(out, dataset)
        print(dataset.version)
    emit(as_json, _dataset_record(dataset), show)


@data_app.command("log")
def data_log(workspace: WorkspaceOpt = Path("workspace"),
             name: Annotated[Optional[str], typer.Option(
                 help="Only versions of this dataset name.")] = None,
             as_json: JsonOpt = False) -> None:
    """List the dataset versions of a workspace, newest first, with parents and state.

    Example: helox data log --workspace workspace
    """
    from helox.data import versions
    from helox.data.report import log_lines

    root = versions.datasets_root(workspace)
    found = [d for d in versions.all_versions(root) if name is None or d.name == name]
    heads = {d.name: versions.head(root, d.name) for d in found}
    record = [{"version": d.version, "name": d.name, "path": d.path,
               "head": heads[d.name] == d.version, "parents": d.lineage.get("parents") or [],
               "created_at": d.lineage.get("created_at")} for d in found]
    emit(as_json, record, lambda: print("\n".join(log_lines(found, heads)) if found
                                         else f"no dataset versions in {root}"))


@data_app.command("show")
def data_show(version: VersionArg, workspace: WorkspaceOpt = Path("workspace"),
              as_json: JsonOpt = False) -> None:
    """Print a version's lineage (parents, sources, pipeline) and its step statistics.

    Example: helox data show 2ba51aa8
    """
    from helox.data import versions
    from helox.data.report import print_show

    dataset = versions.resolve(versions.datasets_root(workspace), version)
    emit(as_json, _dataset_record(dataset), lambda: print_show(out, dataset))


@data_app.command("verify")
def data_verify(version: VersionArg, workspace: WorkspaceOpt = Path("workspace"),
                as_json: JsonOpt = False) -> None:
    """Re-checksum every shard of a version; quarantine corrupted ones and say how to roll back.

    Exits 1 when a file is corrupted. Example: helox data verify 2ba51aa8
    """
    from helox.data import versions

    root = versions.datasets_root(workspace)
    dataset = versions.resolve(root, version)
    bad = dataset.verify()
    if not bad:
        emit(as_json, {"version": dataset.version, "ok": True, "corrupted": []},
              lambda: out.print(f"dataset {dataset.version}: every shard and the tokenizer "
                                "match the manifest"))
        return
    report = versions.quarantine(root, dataset, bad)
    if as_json:
        emit(True, {"version": dataset.version, "ok": False, "corrupted": bad,
                     "moved_to": report.moved_to, "parent": report.parent}, lambda: None)
    raise HeloxError(f"dataset {dataset.version}: {len(bad)} corrupted file(s): "
                     f"{', '.join(bad)}; moved to {report.moved_to} (quarantined)",
                     hint=versions.rollback_hint({"parent": report.parent}))


NameArg = Annotated[str, typer.Argument(help="Dataset name (data.name in the recipe).")]
PrincipalArg = Annotated[str, typer.Argument(help="Principal (user or service); '*' is everyone.")]
ReadOpt = Annotated[bool, typer.Option("--read", help="The read permission.")]
WriteOpt = Annotated[bool, typer.Option("--write", help="The write permission.")]


def _permissions(read: bool, write: bool) -> list[str]:
    if not (read or write):
        raise HeloxError("no permission given", hint="add --read, --write or both")
    return [p for p, on in (("read", read), ("write", write)) if on]


def _emit_acl(as_json: bool, name: str, acl) -> None:
    grants = ", ".join(f"{p}: {'+'.join(perms)}" for p, perms in sorted(acl.grants.items()))
    emit(as_json, {"name": name, "owner": acl.owner, "grants": acl.grants},
          lambda: out.print(f"{name}: owner {acl.owner}; grants: {grants or 'none'}",
                            markup=False))


@data_app.command("grant")
def data_grant(name: NameArg, principal: PrincipalArg, read: ReadOpt = False,
               write: WriteOpt = False, workspace: WorkspaceOpt = Path("workspace"),
               as_json: JsonOpt = False) -> None:
    """Give a principal read and/or write access to a dataset name (owner only; audited).

    You act as HELOX_PRINCIPAL (else your login name).
    Example: helox data grant quickstart bob --read
    """
    from helox.data import access

    by = access.resolve_principal(None)
    _emit_acl(as_json, name, access.grant(access.governance_dir(workspace), name, principal,
                                          _permissions(read, write), by))


@data_app.command("revoke")
def data_revoke(name: NameArg, principal: PrincipalArg, read: ReadOpt = False,
                write: WriteOpt = False, workspace: WorkspaceOpt = Path("workspace"),
                as_json: JsonOpt = False) -> None:
    """Take read and/or write access away from a principal (owner only; audited).

    Example: helox data revoke quickstart bob --read --write
    """
    from helox.data import access

    by = access.resolve_principal(None)
    _emit_acl(as_json, name, access.revoke(access.governance_dir(workspace), name, principal,
                                           _permissions(read, write), by))


@data_app.command("transfer")
def data_transfer(name: NameArg, new_owner: Annotated[str, typer.Argument(
                      help="The principal who becomes the owner.")],
                  workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False,
                  ) -> None:
    """Hand a dataset name to a new owner (owner only; you keep no access unless granted).

    Example: helox data transfer quickstart carol
    """
    from helox.data import access

    by = access.resolve_principal(None)
    _emit_acl(as_json, name, access.transfer_owner(access.governance_dir(workspace), name,
                                                   new_owner, by))


@data_app.command("audit")
def data_audit(workspace: WorkspaceOpt = Path("workspace"),
               verify: Annotated[bool, typer.Option(
                   "--verify", help="Check the hash chain, its anchor and the access list; "
                                    "exit 1 on any edited, deleted or reordered entry.")] = False,
               dataset: Annotated[Optional[str], typer.Option(help="Only this dataset name.")
                                  ] = None,
               principal: Annotated[Optional[str], typer.Option(
                   help="Only entries by or about this principal.")] = None,
               as_json: JsonOpt = False) -> None:
    """Print the audit log of dataset access (reads, writes, grants, denials) or verify it.

    Example: helox data audit --verify
    """
    from helox.data import access

    log = access.AuditLog(access.governance_dir(workspace))
    if verify:
        report = log.verify()
        if not report.ok:
            raise HeloxError(f"the audit log {log.path} was tampered with or damaged:\n{report}",
                             hint="restore governance/ from a backup; the lines above say "
                                  "which entries differ")
        emit(as_json, {"ok": True, "entries": report.num_entries},
              lambda: out.print(f"audit log intact: {report.num_entries} entries, chain and "
                                "anchor match"))
        return
    entries = list(log.entries(dataset=dataset, principal=principal))

    def show() -> None:
        for entry in entries:
            details = " ".join(f"{k}={v}" for k, v in sorted(entry["details"].items()))
            print(f"{entry['seq']:>6} {entry['time'][:19]} {entry['principal']:<16} "
                  f"{entry['action']:<8} {entry['dataset']} {entry['version'] or '-'} "
                  f"{details}")
    emit(as_json, entries, show)


# ---------------------------------------------------------------------------------------------
# training and looking at a run


@app.command("train")
def train_cmd(recipe: RecipeArg, set_: SetOpt = None, run_dir: RunDirOpt = None,
              until_step: Annotated[Optional[int], typer.Option(
                  help="Stop after this step (checkpointed) as if preempted; the schedule still "
                       "runs to train.max_steps and a later `helox train` resumes.")] = None,
              nproc: Annotated[Optional[int], typer.Option(
                  min=1, help="Train on this many processes of this machine, started by "
                              "torch.distributed.run (gloo on CPU, NCCL on GPUs); the "
                              "parallel section says how they share the work. Same as "
                              "`torchrun --standalone --nproc-per-node N -m helox.cli train`."
                              )] = None,
              max_restarts: Annotated[int, typer.Option(
                  min=0, help="With --nproc: start the processes again this many times when "
                              "one fails; each restart resumes from the newest "
                              "checkpoint.")] = 0,
              dry_run: Annotated[bool, typer.Option(
                  "--dry-run", help="Print each layer's parameters, compute dtype "
                                    "(train.precision, train.fp32_modules) and activation "
                                    "checkpointing, and the memory of weights and optimizer "
                                    "state; do not train.")] = False,
              as_json: JsonOpt = False) -> None:
    """Train a model from a recipe; resumes from the newest valid checkpoint in the run folder.
    Under torchrun (or with --nproc) every process is one rank of the job.

    Example: helox train quickstart --run-dir workspace/runs/qs --set optim.lr=1e-3
    Example: helox train quickstart --nproc 2 --set parallel.dp_shard=2
    """
    from dataclasses import asdict

    from helox.distributed.job import join_job, leave_job
    from helox.run import default_run_dir, prepare_for_job, prepare_with_progress
    from helox.training.loop import train
    from helox.training.setup import pick_device

    config = _load(recipe, set_)
    if dry_run:
        _dry_run(config, as_json)
        return
    if nproc is not None and nproc > 1:
        _launch(nproc, max_restarts, ["train", str(recipe), *_repeat("--set", set_ or []),
                                      *_option("--run-dir", run_dir),
                                      *_option("--until-step", until_step),
                                      *(["--json"] if as_json else [])])
    job = join_job(config.parallel, pick_device(config.train.device))
    try:
        dataset = prepare_for_job(config, job,
                                  lambda: prepare_with_progress(config, console, "train"))
        result = train(config, run_dir or default_run_dir(config), dataset, until_step, console)
    finally:
        leave_job(job)
    if job.main:
        emit(as_json, asdict(result),
              lambda: out.print(f"step {result.step}: checkpoint {result.checkpoint}"))


def _launch(nproc: int, max_restarts: int, args: list[str]) -> None:
    """Become torch.distributed.run starting `nproc` processes of `helox <args>` on this
    machine (a c10d rendezvous on a free local port); signals reach it directly, and it
    forwards SIGTERM to every rank."""
    import os

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
               "-m", "helox.cli", *args]
    # Restarted workers must not share the rendezvous's TCP store: they would read the dead
    # round's addresses and fail to connect (pytorch/pytorch#135712).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    console.print(f"starting {nproc} processes: {' '.join(command[1:])}", soft_wrap=True,
                  markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def _repeat(flag: str, values: list[str]) -> list[str]:
    return [part for value in values for part in (flag, value)]


def _option(flag: str, value: Any) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _dry_run(config: RunConfig, as_json: bool) -> None:
    from helox.run import prepare_with_progress
    from helox.training.precision import dry_run_plan, print_plan
    from helox.training.setup import pick_device, resolve_vocab_size
    from helox.training.step import pick_precision

    if config.model.vocab_size is None:  # the tokenizer decides it, as in training
        config = resolve_vocab_size(config, prepare_with_progress(config, console, "train"))
    device = pick_device(config.train.device)
    plan = dry_run_plan(config, device, pick_precision(config.train.precision, device))
    emit(as_json, plan, lambda: print_plan(out, plan))


@app.command()
def generate(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(min=1, help="Sample among the top k.")] = 40,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    ema: EmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Continue a prompt with a trained model.

    Example: helox generate workspace/runs/quickstart --prompt "ROMEO." --max-new-tokens 40
    """
    from helox.api import load_trained_model

    trained = load_trained_model(model, ema=ema, warn=warn)
    text = trained.complete(prompt, max_new_tokens, temperature, top_k, seed)
    emit(as_json, {"checkpoint": trained.checkpoint, "ema": ema, "prompt": prompt,
                    "completion": text}, lambda: print(prompt + text))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (holds metrics.jsonl).")],
    out_file: Annotated[Optional[Path], typer.Option(
        "--out", help="HTML file to write (default: RUN_DIR/report.html).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the run's dashboard: one self-contained HTML file (no network to view it).

    Loss and val loss, LR vs loss, grad norm, attention entropy per layer and head, activation
    histograms, dead units, drift, alerts, the run fingerprint and the dataset lineage.

    Example: helox report workspace/runs/quickstart
    """
    from helox.observe.report import write_report

    path = write_report(run_dir, out_file)
    size_mib = path.stat().st_size / 2**20
    emit(as_json, {"report": path, "size_mib": round(size_mib, 3)},
          lambda: out.print(f"report: {path} ({size_mib:.1f} MiB; open it in a browser)"))


@app.command()
def explain(
    model: ModelArg,
    prompt: Annotated[str, typer.Option(help="Text to explain.")],
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder to write (default: RUN_DIR/explain/<checkpoint>-<prompt hash>, "
                      "with -ema for --ema).")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Tokens per cell of the logit lens.")] = 5,
    ema: EmaOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Attention maps per layer and head, and a logit lens (the top tokens each layer's
    residual stream predicts), as PNG files and one HTML page.

    Example: helox explain workspace/runs/quickstart --prompt "ROMEO. What light"
    """
    from helox.observe.explain import explain_run

    folder = explain_run(model, prompt, out_dir, top_k=top_k, ema=ema, warn=warn)
    emit(as_json, {"folder": folder,
                    **json.loads((folder / "explain.json").read_text(encoding="utf-8"))},
          lambda: out.print(f"explanation: {folder} (open {folder / 'explain.html'})"))


# ---------------------------------------------------------------------------------------------
# evaluation


@app.command("eval")
def eval_cmd(
    model: AnyModelArg,
    suite: Annotated[str, typer.Option(help="A bundled suite's name (quickstart, "
                                            "long-context) or a suite.yaml path.")
                     ] = "quickstart",
    baseline: Annotated[Optional[str], typer.Option(
        help="Compare with this version's results (a version under RUN_DIR/evals/SUITE/, a "
             "unique prefix, or a results folder); a regression exits 1.")] = None,
    ema: EmaOpt = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward.")] = 8,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Keep results under OUT/evals/ (default: the run or model folder).")
    ] = None,
    lm_eval: Annotated[Optional[str], typer.Option(
        "--lm-eval", help="Run these lm-evaluation-harness tasks instead (comma-separated; "
                          "Helox's bundled local ones are helox_local).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        min=1, help="--lm-eval: items per task at most.")] = None,
    privacy: Annotated[bool, typer.Option(
        "--privacy", help="Run membership-inference attacks instead (loss, min-k%, zlib): "
                          "ROC AUC of training documents against held-out ones.")] = False,
    privacy_documents: Annotated[int, typer.Option(
        min=2, help="--privacy: documents drawn from each split.")] = 200,
    privacy_max_tokens: Annotated[int, typer.Option(
        min=2, help="--privacy: tokens scored per document (its start).")] = 128,
    dataset: Annotated[Optional[Path], typer.Option(
        help="--privacy: the dataset version folder (for a Hugging Face model).")] = None,
    seed: Annotated[int, typer.Option(help="--privacy: sampling and bootstrap seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Score a model on an eval suite; exit 1 when a threshold fails or a metric regressed.

    Items found in the model's training data are listed and scored apart. Results (per item
    and per metric, with 95% bootstrap intervals) go to RUN_DIR/evals/SUITE/VERSION/.

    Example: helox eval workspace/runs/quickstart --suite quickstart --baseline step-00000280
    """
    from helox.eval.report import print_outcome
    from helox.eval.runner import evaluate

    if lm_eval is not None:
        _run_lm_eval(model, [t for t in lm_eval.split(",") if t], limit, batch_size, ema,
                     out_dir, as_json)
        return
    if privacy:
        _run_privacy(model, privacy_documents, privacy_max_tokens, dataset, seed, ema,
                     batch_size, out_dir, as_json)
        return
    outcome = evaluate(model, suite, baseline, ema=ema, batch_size=batch_size, out=out_dir,
                       console=console, warn=warn)
    record = {"passed": outcome.passed, "folder": outcome.folder,
              "result": outcome.result.as_dict(), "baseline": outcome.baseline,
              "regressions": [f"{c.task}.{c.metric}" for c in outcome.regressions]}
    emit(as_json, record, lambda: print_outcome(out, outcome))
    if not outcome.passed:
        raise typer.Exit(1)


def _run_privacy(model: Path, documents: int, max_tokens: int, dataset: Path | None, seed: int,
                 ema: bool, batch_size: int, out_dir: Path | None, as_json: bool) -> None:
    from helox.eval.privacy import privacy_table, run_privacy
    from helox.eval.runner import results_root

    report = run_privacy(model, num_documents=documents, max_tokens=max_tokens, seed=seed,
                         dataset=dataset, ema=ema, batch_size=batch_size, warn=warn)
    folder = (out_dir or results_root(Path(report.source))) / "evals" / "privacy" / report.model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "privacy.json"
    path.write_text(json.dumps(report.as_dict(), indent=1, allow_nan=True))

    def show() -> None:
        out.print(privacy_table(report))
        out.print(f"results: {path}")
    emit(as_json, {"results": path, **report.as_dict()}, show)


def _run_lm_eval(model: Path, tasks: list[str], limit: int | None, batch_size: int,
                 ema: bool, out_dir: Path | None, as_json: bool) -> None:
    from rich.table import Table

    from helox.eval.lm import load_language_model
    from helox.eval.lm_eval_adapter import lm_eval_rows, run_lm_eval, write_lm_eval_results
    from helox.eval.runner import results_root

    lm = load_language_model(model, ema=ema, batch_size=batch_size, warn=warn)
    results = run_lm_eval(lm, tasks, limit=limit, batch_size=batch_size)
    folder = write_lm_eval_results(results, out_dir or results_root(Path(lm.source)),
                                   lm.version)
    rows = lm_eval_rows(results)

    def show() -> None:
        table = Table(title=f"lm-eval · model {lm.version}", title_justify="left")
        for column in ("task", "metric", "value", "stderr"):
            table.add_column(column, justify="right" if column in ("value", "stderr")
                             else "left")
        for task, metric, value, stderr in rows:
            table.add_row(task, metric, f"{value:.4f}",
                          "" if stderr is None else f"{stderr:.4f}")
        out.print(table)
        out.print(f"results: {folder / 'results.json'}")
    emit(as_json, {"results": folder / "results.json", "model": lm.version,
                    "metrics": [dict(zip(("task", "metric", "value", "stderr"), row))
                                for row in rows]}, show)


# ---------------------------------------------------------------------------------------------
# export


FormatOpt = Annotated[str, typer.Option(
    "--format", help="hf, onnx, gguf, tensorrt (an engine built from the ONNX; needs "
                     "TensorRT and an NVIDIA GPU), or peft (a LoRA run's adapter alone; the "
                     "other formats hold a LoRA run's merged model).")]
TypeOpt = Annotated[str, typer.Option(
    "--type", help="gguf: tensor type of the weight matrices: F32, F16, Q8_0 or Q4_0.")]
KeyOpt = Annotated[Optional[Path], typer.Option(
    help="Ed25519 private key to sign the manifest (default: $HELOX_SIGNING_KEY, else "
         "~/.config/helox/signing-key.pem, created on first use).")]


@app.command()
def export(
    model: ModelArg,
    format_: FormatOpt = "hf",
    gguf_type: TypeOpt = "F16",
    out_path: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder (hf) or file to write (default: "
                      "RUN_DIR/exports/<checkpoint>/...).")] = None,
    ema: EmaOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export a trained model: a Hugging Face folder (transformers), ONNX (onnxruntime) or
    GGUF (llama.cpp), with the training metadata embedded and a signed manifest.

    Example: helox export workspace/runs/quickstart --format gguf --type Q8_0
    """
    from dataclasses import asdict

    from helox.export.exporter import export_model

    exported = export_model(model, format_, out_path, gguf_type=gguf_type, ema=ema,
                            overwrite=overwrite, key=key, announce=console.print)

    def show() -> None:
        out.print(f"{exported.format}: {exported.artifact} ({exported.seconds:.1f} s)")
        out.print(f"manifest: {exported.manifest} (model fingerprint "
                  f"{exported.metadata['helox.model_fingerprint'][:16]}…)")
    emit(as_json, asdict(exported), show)


@app.command()
def parity(
    model: ModelArg,
    formats: Annotated[Optional[list[str]], typer.Option(
        "--format", help="hf, onnx or gguf (repeatable; default all three).")] = None,
    gguf_types: Annotated[Optional[list[str]], typer.Option(
        "--type", help="gguf: F32, F16, Q8_0 or Q4_0 (repeatable; default all four).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", help="Keep the exports here (default: a temporary folder); parity.json is "
                      "written to OUT, else RUN_DIR/exports/<checkpoint>/parity.json.")] = None,
    ema: EmaOpt = False,
    key: Annotated[Optional[Path], typer.Option(
        help="Signing key for the exports' manifests (as helox export).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export to every format, run each in its own runtime (transformers, onnxruntime,
    llama.cpp) on a fixed prompt set, and compare with the fp32 model: max |Δlogit|, mean KL,
    top-1 agreement, perplexity Δ, against per-format thresholds. Also train mode against
    eval mode and one sequence against a padded batch. Exit 1 when a threshold fails.

    Example: helox parity workspace/runs/quickstart --format hf --format gguf --type Q8_0
    """
    from helox.export.exporter import exports_folder
    from helox.export.parity import parity_names, parity_table, run_parity, write_report

    report = run_parity(model, parity_names(formats, gguf_types), out=out_dir, key=key, ema=ema,
                        progress=lambda m: console.print(escape(m)))
    target = write_report(report, (out_dir or exports_folder(Path(report.model), ema))
                          / "parity.json")

    def show() -> None:
        out.print(parity_table(report))
        out.print(f"parity: {target}")
    emit(as_json, {"report": target, **report.as_dict()}, show)
    if not report.passed:
        raise typer.Exit(1)


@app.command("launch-file")
def launch_file(
    target: Annotated[str, typer.Argument(help="slurm, trainjob (Kubeflow Trainer) or "
                                               "pytorchjob (Kubeflow Training Operator).")],
    recipe: Annotated[str, typer.Argument(help="The recipe as the nodes see it: a path on "
                                               "their shared storage, or a bundled name.")],
    nodes: Annotated[int, typer.Option(min=1, help="Machines.")] = 1,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="Processes per machine (one per "
                                                            "GPU).")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="CPU processes (gloo) instead of one "
                                                    "GPU each (NCCL).")] = False,
    run_dir: Annotated[str, typer.Option(help="The run folder, on storage every node "
                                              "mounts.")] = "workspace/runs/helox",
    image: Annotated[str, typer.Option(help="Container image with Helox installed "
                                            "(Kubernetes).")] = "python:3.11",
    max_restarts: Annotated[int, typer.Option(min=0, help="torchrun restarts after a "
                                                          "failure (each resumes).")] = 1,
    out_path: Annotated[Optional[Path], typer.Option("--out", help="Write the file here "
                                                                   "instead of stdout.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print (or write) the file that launches `helox train RECIPE` on a cluster: a Slurm
    batch script, a Kubeflow TrainJob or a PyTorchJob, for NODES × NPROC_PER_NODE ranks.

    Example: helox launch-file slurm recipes/pretrain.yaml --nodes 4 --nproc-per-node 8
    """
    from helox.distributed.launch import LaunchSpec, render

    spec = LaunchSpec(recipe, nodes, nproc_per_node, not cpu, run_dir, image, max_restarts)
    text = render(target, spec)
    if out_path is not None:
        out_path.write_text(text)
    record = {"target": target, "recipe": recipe, "world_size": spec.world_size,
              **({"file": str(out_path)} if out_path else {"text": text})}
    emit(as_json, record, lambda: out.print(f"{target}: {out_path}") if out_path
          else print(text, end=""))


@checkpoint_app.command("consolidate")
def checkpoint_consolidate(
    model: ModelArg,
    out_path: Annotated[Optional[Path], typer.Option(
        "--out", help="The checkpoint folder to write (default: "
                      "RUN_DIR/consolidated/<checkpoint>).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a checkpoint saved by a multi-process job (shards in dcp/, one file per rank)
    in the single-file form one process writes. Helox reads both; this is for other tools.

    Example: helox checkpoint consolidate workspace/runs/quickstart --out ckpt-single
    """
    from helox.checkpoint import CONFIG_FILE, resolve_checkpoint
    from helox.config import read_saved_config
    from helox.training.consolidate import consolidate, default_out

    source = resolve_checkpoint(model, warn)
    written = consolidate(source, out_path or default_out(source),
                          read_saved_config(source / CONFIG_FILE))
    emit(as_json, {"source": str(source), "checkpoint": str(written)},
          lambda: out.print(f"{source} → {written}"))


@app.command("import-hf")
def import_hf_cmd(
    source: Annotated[Path, typer.Argument(help="A transformers Llama folder, or a .gguf "
                                                "file transformers reads.")],
    out_dir: Annotated[Path, typer.Option(
        "--out", help="Folder to write (a run folder with one checkpoint and "
                      "finetune.yaml).")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn a transformers Llama into a Helox checkpoint to fine-tune.

    Example: helox import-hf path/to/SmolLM2-135M --out workspace/imports/smollm2
    """
    from helox.export.importing import FINETUNE_RECIPE, import_hf

    console.print(f"importing {source} (transformers reads it; a GGUF file is dequantized)")
    checkpoint = import_hf(source, out_dir, overwrite=overwrite)
    recipe = out_dir / FINETUNE_RECIPE

    def show() -> None:
        out.print(f"checkpoint: {checkpoint}")
        out.print(f"fine-tune: helox train {recipe} (replace its data first)")
    emit(as_json, {"checkpoint": checkpoint, "recipe": recipe}, show)


# ---------------------------------------------------------------------------------------------
# provenance


@provenance_app.command("keygen")
def provenance_keygen(
    key_out: Annotated[Path, typer.Option(
        "--out", help="Private key file to create (PEM); the public key goes to OUT.pub.")],
    as_json: JsonOpt = False,
) -> None:
    """Create an Ed25519 signing key pair for export manifests.

    Example: helox provenance keygen --out keys/helox.pem
    """
    from helox.export.manifest import generate_key

    public = generate_key(key_out)
    emit(as_json, {"private_key": key_out, "public_key": public},
          lambda: out.print(f"private key: {key_out} (keep it secret)\npublic key: {public} "
                            "(give it to verifiers)"))


@provenance_app.command("verify")
def provenance_verify(
    artifact: Annotated[Path, typer.Argument(help="An exported folder or file, or its "
                                                  "manifest.")],
    public_key: Annotated[Optional[Path], typer.Option(
        help="The signer's public key (.pub): without it the signature is checked against "
             "the key the manifest carries, which proves integrity, not who signed.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check an export: signature, file hashes, weights fingerprint, embedded metadata.
    Exit 1 when any check fails.

    Example: helox provenance verify model.gguf --public-key keys/helox.pem.pub
    """
    from dataclasses import asdict

    from rich.table import Table

    from helox.export.manifest import verify_artifact

    result = verify_artifact(artifact, public_key)

    def show() -> None:
        table = Table(title=f"provenance of {result.artifact}", title_justify="left")
        for column in ("check", "result", "detail"):
            table.add_column(column)
        for check in result.checks:
            table.add_row(check.name, "[green]ok[/]" if check.passed else "[red]FAILED[/]",
                          escape(check.detail))
        out.print(table)
    emit(as_json, {"artifact": result.artifact, "passed": result.passed,
                    "checks": [asdict(check) for check in result.checks]}, show)
    if not result.passed:
        for check in result.failures():
            console.print(f"[bold red]failed:[/] {check.name}: {escape(check.detail)}")
        raise typer.Exit(1)


@provenance_app.command("watermark-secret")
def provenance_watermark_secret(
    secret_out: Annotated[Path, typer.Option(
        "--out", help="File to create (64 hex digits, mode 0600).")],
    as_json: JsonOpt = False,
) -> None:
    """Create a secret for the functional watermark (watermark.secret_file of a recipe).

    Example: helox provenance watermark-secret --out keys/watermark.secret
    """
    from helox.training.watermark import new_secret

    path = new_secret(secret_out)
    emit(as_json, {"secret_file": path},
          lambda: out.print(f"watermark secret: {path} (keep it private; train with "
                            "watermark.secret_file and an objective named watermark)"))


@provenance_app.command("detect")
def provenance_detect(
    model: AnyModelArg,
    secret_file: Annotated[Path, typer.Option(help="The watermark's secret.")],
    card: Annotated[Optional[Path], typer.Option(
        help="The watermarked run's watermark.json (default: the one in MODEL; an exported or "
             "suspect model has none).")] = None,
    max_p_value: Annotated[float, typer.Option(
        min=0, max=1, help="Detected when the p-value is at most this.")] = 1e-6,
    show_text: Annotated[bool, typer.Option(help="Show signatures and continuations.")] = False,
    expect: Annotated[Optional[str], typer.Option(
        help="detected or absent: exit 1 when the verdict differs (for CI).")] = None,
    result_out: Annotated[Optional[Path], typer.Option(
        "--out", help="Also write the full result (JSON) to this file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Test a model, as a black box (greedy generation only), for the functional watermark
    trained with a secret: its trigger prompts must continue with their signatures, and its
    never-trained decoys must not. Prints the verdict with its p-value.

    Example: helox provenance detect RUN_DIR/exports/step-00000420/hf --secret-file
    keys/watermark.secret --card RUN_DIR/watermark.json
    """
    from helox.training.watermark import detect_watermark_at, summary, table

    if expect not in (None, "detected", "absent"):
        raise typer.BadParameter("--expect takes detected or absent")
    detection = detect_watermark_at(model, secret_file, card, max_p_value=max_p_value)
    if result_out is not None:
        result_out.write_text(json.dumps(detection.as_dict(), indent=1) + "\n")

    def show() -> None:
        out.print(table(detection, show_text=show_text))
        out.print(summary(detection), markup=False)
    emit(as_json, detection.as_dict(), show)
    if expect == "detected" and not detection.detected or \
            expect == "absent" and detection.verdict != "not_detected":
        raise typer.Exit(1)


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
