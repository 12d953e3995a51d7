"""`helox registry`: register a trained model, promote it through the gates, roll back, look."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from helox.cli.common import JsonOpt, ModelArg, WorkspaceOpt, console, emit, out

registry_app = typer.Typer(
    help="The model registry (MLflow; SQLite in the workspace unless platform.yaml names a "
         "server): versions with their lineage, aliases dev → staging → prod behind the "
         "promotion gates, rollback. Every change is audited (helox data audit).\n\n"
         "Example: helox registry promote quickstart 1 --to staging", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="Registered model name, e.g. quickstart.")]
AliasOpt = Annotated[str, typer.Option(help="dev, staging or prod.")]


def _open(workspace: Path):
    from helox.registry.store import open_registry

    return open_registry(workspace)


@registry_app.command("register")
def register(model: ModelArg, name: Annotated[str, typer.Option(
                 "--name", help="Registered model name (created on first use).")],
             alias: Annotated[Optional[str], typer.Option(
                 help="Alias for the new version: dev (default), or none.")] = "dev",
             description: Annotated[str, typer.Option(help="The version's description.")] = "",
             workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False) -> None:
    """Register a checkpoint as a new version: its exports, evaluations and parity report as
    artifacts, its lineage (fingerprints, dataset version, config hash, parent, eval results
    with intervals, parity) as tags. A LoRA run registers as an adapter of its registered base.

    Example: helox registry register workspace/runs/quickstart --name quickstart
    """
    from helox.registry.lineage import gather

    with _open(workspace) as registry:
        with console.status(f"reading {model}"):
            candidate = gather(model, warn=lambda message: console.print(message))
        with console.status(f"registering {candidate.checkpoint} in {registry.uri}"):
            info = registry.register(candidate, name, None if alias == "none" else alias,
                                     description)
    emit(as_json, _version_record(info), lambda: _print_version(info))


@registry_app.command("promote")
def promote(name: NameArg, version: Annotated[str, typer.Argument(help="Version number.")],
            to: Annotated[str, typer.Option("--to", help="staging or prod (gated), or dev.")],
            force: Annotated[bool, typer.Option(
                help="Promote even though gates fail (needs --reason; audited).")] = False,
            reason: Annotated[Optional[str], typer.Option(help="Why --force.")] = None,
            workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False) -> None:
    """Point an alias at a version once it passes the gates: its suites' thresholds, no
    significant regression against the version holding the alias now, its parity report,
    and for an adapter, its base being the model the alias serves.

    Example: helox registry promote quickstart 2 --to prod
    """
    from helox.registry.store import PromotionRefused

    with _open(workspace) as registry:
        try:
            change = registry.promote(name, version, to, force=force, reason=reason)
        except PromotionRefused as refused:
            out.print(_gates_table(refused.report))
            raise
    record = {"name": name, "alias": to, "version": change.version,
              "previous": change.previous, "forced": change.forced,
              "gates": change.gates.as_dict() if change.gates else None}

    def show() -> None:
        if change.gates is not None:
            out.print(_gates_table(change.gates))
        note = " (forced past failing gates)" if change.forced and not change.gates.passed \
            else ""
        out.print(f"{name}@{to} → version {change.version} (was "
                  f"{change.previous or 'unset'}){note}")
    emit(as_json, record, show)


@registry_app.command("rollback")
def rollback(name: NameArg, alias: AliasOpt = "prod",
             workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False) -> None:
    """Move an alias back to the version that held it before the current one.

    Example: helox registry rollback quickstart --alias prod
    """
    with _open(workspace) as registry:
        change = registry.rollback(name, alias)
    emit(as_json, {"name": name, "alias": alias, "version": change.version,
                   "rolled_back": change.previous},
         lambda: out.print(f"{name}@{alias} → version {change.version} (rolled back from "
                           f"{change.previous})"))


@registry_app.command("list")
def list_(name: Annotated[Optional[str], typer.Argument(
              help="Only this model's versions.")] = None,
          workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False) -> None:
    """Registered models, their versions and aliases, with the main lineage of each.

    Example: helox registry list
    """
    with _open(workspace) as registry:
        names = [name] if name else registry.names()
        versions = [info for each in names for info in registry.versions(each)]
    emit(as_json, [_version_record(info) for info in versions],
         lambda: out.print(_versions_table(versions, registry.uri)))


@registry_app.command("show")
def show(name: NameArg, ref: Annotated[str, typer.Argument(
             help="A version number or an alias (prod, @prod).")] = "@prod",
         workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False) -> None:
    """One version: its aliases, lineage, eval results, parity and where its files are.

    Example: helox registry show quickstart @staging
    """
    with _open(workspace) as registry:
        info = registry.version(name, ref)
    emit(as_json, _version_record(info), lambda: _print_version(info))


def _version_record(info) -> dict:
    return {"name": info.name, "version": info.version, "aliases": info.aliases,
            "kind": info.kind, "uri": info.uri, "source": info.source,
            "created": info.created, "lineage": info.lineage()}


def _print_version(info) -> None:
    aliases = ", ".join(f"@{a}" for a in info.aliases) or "no alias"
    out.print(f"{info.name} version {info.version} ({info.kind}; {aliases}; registered "
              f"{info.created})", highlight=False)
    for key, value in info.lineage().items():
        out.print(f"  {key:<40} {value}", highlight=False, markup=False)
    out.print(f"  {'artifacts':<40} {info.source}", highlight=False, markup=False)


def _versions_table(versions, uri: str) -> Table:
    table = Table(title=f"model registry · {uri}", title_justify="left")
    for column in ("model", "version", "aliases", "kind", "evals", "parity", "fingerprint",
                   "registered"):
        table.add_column(column)
    for info in versions:
        tags = info.lineage()
        evals = ", ".join(f"{key.removeprefix('eval.')} {value}" for key, value in tags.items()
                          if key.startswith("eval.") and key.count(".") == 1)
        table.add_row(info.name, info.version, " ".join(f"@{a}" for a in info.aliases),
                      info.kind, evals or "-", tags.get("parity", "-"),
                      info.model_fingerprint[:12], info.created)
    return table


def _gates_table(report) -> Table:
    table = Table(title=f"promotion gates for `{report.target}`", title_justify="left")
    for column in ("gate", "result", "detail"):
        table.add_column(column)
    for check in report.checks:
        table.add_row(check.name, "[green]pass[/]" if check.passed else "[red]FAIL[/]",
                      check.detail)
    return table
