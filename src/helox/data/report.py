"""Tables for `helox data prepare`, `data log` and `data show` (rich renderables)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from helox.data.shards import DatasetVersion
from helox.data.versions import quarantine_record


def step_table(split: str, statistics: list[dict]) -> Table:
    table = Table(title=f"{split}: what each step kept and removed", title_justify="left")
    for column in ("step", "in", "kept", "dropped (by reason)", "changed", "seconds"):
        table.add_column(column, justify="right" if column in ("in", "kept", "seconds")
                         else "left", overflow="fold")
    for row in statistics:
        table.add_row(row["step"], f"{row['docs_in']:,}", f"{row['docs_out']:,}",
                      _counts(row["dropped"]), _counts(row.get("changed", {})),
                      f"{row['seconds']:.2f}" if "seconds" in row else "")
    return table


def _counts(counts: dict) -> str:
    return ", ".join(f"{reason} {count:,}" for reason, count in counts.items())


def print_report(console: Console, dataset: DatasetVersion) -> None:
    report = dataset.report
    for split, statistics in report.get("splits", {}).items():
        console.print(step_table(split, statistics))
    for excluded in report.get("excluded_sources", []):
        console.print(f"excluded source {excluded['path']} ({excluded['config_path']}): "
                      f"{excluded['reason']}", markup=False, soft_wrap=True)
    console.print(f"report: {dataset.path / 'report.json'}; every removed document with its "
                  f"reason: {dataset.path / 'removed.jsonl'}", markup=False, soft_wrap=True)


def log_table(datasets: list[DatasetVersion], heads: dict[str, str]) -> Table:
    table = Table(title="dataset versions, newest first", title_justify="left")
    for column in ("version", "name", "created (UTC)", "parent", "train tokens", "documents",
                   "state"):
        table.add_column(column, no_wrap=column in ("version", "parent"), overflow="fold")
    for dataset in datasets:
        lineage, train = dataset.lineage, dataset.split("train")
        parents = ", ".join(lineage.get("parents") or []) or "-"
        state = "quarantined" if quarantine_record(dataset.path) else (
            "head" if heads.get(dataset.name) == dataset.version else "")
        created = lineage.get("created_at", "?")[:19].replace("T", " ")
        table.add_row(dataset.version, dataset.name, created, parents,
                      f"{train['num_tokens']:,}", f"{train['num_documents']:,}", state)
    return table


def print_show(console: Console, dataset: DatasetVersion) -> None:
    lineage = dataset.lineage
    console.print(f"version {dataset.version} ({dataset.name}) at {dataset.path}", markup=False)
    for label, value in (("created", lineage.get("created_at")),
                         ("by", lineage.get("principal")),
                         ("parents", ", ".join(lineage.get("parents") or []) or "none"),
                         ("sources judged as of", lineage.get("as_of"))):
        console.print(f"{label}: {value}", markup=False)
    for split, sources in lineage.get("sources", {}).items():
        for source in sources:
            console.print(f"{split} source {source['path']} (trust {source.get('trust')}, "
                          f"{len(source.get('files', []))} file(s))", markup=False,
                          soft_wrap=True)
    steps = [step["step"] for step in lineage.get("pipeline", [])]
    console.print(f"pipeline: {' → '.join(steps) or 'none'}", markup=False)
    for split, info in dataset.manifest["splits"].items():
        console.print(f"{split}: {info['num_tokens']:,} tokens, {info['num_documents']:,} "
                      f"documents, {len(info['shards'])} shard(s); tokens by domain: "
                      f"{_counts(info.get('domain_tokens', {}))}", markup=False, soft_wrap=True)
    print_report(console, dataset)
    record = quarantine_record(dataset.path)
    if record:
        console.print(f"[red]quarantined[/]: {', '.join(record['bad_files'])}")
