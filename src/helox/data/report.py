"""Tables for `helox data prepare`, `data log` and `data show` (rich renderables)."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from helox.data.shards import DatasetVersion
from helox.data.versions import quarantine_record


def step_table(split: str, statistics: list[dict]) -> Table:
    """One row per step (documents in, kept, seconds), then one row per drop or edit reason."""
    rows = []
    for row in statistics:
        reasons = [("drop", r, n) for r, n in row["dropped"].items()]
        reasons += [("edit", r, n) for r, n in row.get("changed", {}).items()]
        kind, reason, count = reasons[0] if reasons else ("", "", "")
        rows.append((row["step"], f"{row['docs_in']:,}", f"{row['docs_out']:,}",
                     f"{row['seconds']:.2f}", kind, reason, _number(count)))
        rows += [("", "", "", "", kind, reason, _number(count))
                 for kind, reason, count in reasons[1:]]
    return _table(f"{split}: what each step kept, dropped and edited",
                  ("step", "in", "kept", "seconds", "", "reason", "count"), rows,
                  flexible="reason")


def _number(count) -> str:
    return f"{count:,}" if isinstance(count, int) else ""


def _counts(counts: dict, sep: str = "\n") -> str:
    return sep.join(f"{reason} {count:,}" for reason, count in counts.items())


def summary_line(split: str, statistics: list[dict]) -> str:
    """One line per split for `helox run`: documents read, kept, and the biggest removals."""
    dropped: dict[str, int] = {}
    for row in statistics:
        for reason, count in row["dropped"].items():
            dropped[f"{row['step']}:{reason}"] = count
    top = sorted(dropped.items(), key=lambda item: -item[1])[:4]
    removed = ", ".join(f"{name} {count:,}" for name, count in top)
    return (f"{split}: {statistics[0]['docs_out']:,} documents read, "
            f"{statistics[-1]['docs_out']:,} kept" + (f" (removed: {removed}…)" if top else ""))


def synthetic_lines(report: dict) -> list[str]:
    """One line per synthetic task: documents, and the share of its signal beyond the window."""
    lines = []
    for task in report.get("synthetic", []):
        line = (f"synthetic {task['task']} → domain {task['domain']}: "
                f"{task['train_documents']:,} train / {task['val_documents']:,} val documents")
        signal = task.get("signal")
        if signal:
            line += (f"; {signal['fraction_beyond']:.1%} of the predictable signal lies beyond "
                     f"{signal['local_window_tokens']} tokens")
            if signal["fraction_beyond"] < 0.8:
                line += " (below 80%: lengthen values or shorten cues)"
        lines.append(line)
    return lines


def print_report(console: Console, dataset: DatasetVersion) -> None:
    report = dataset.report
    for split, statistics in report.get("splits", {}).items():
        console.print(step_table(split, statistics))
    for line in synthetic_lines(report):
        console.print(line, markup=False, soft_wrap=True)
    for excluded in report.get("excluded_sources", []):
        console.print(f"excluded source {excluded['path']} ({excluded['config_path']}): "
                      f"{excluded['reason']}", markup=False, soft_wrap=True)
    console.print(f"report: {dataset.path / 'report.json'}; every removed document with its "
                  f"reason: {dataset.path / 'removed.jsonl'}", markup=False, soft_wrap=True)


def log_lines(datasets: list[DatasetVersion], heads: dict[str, str]) -> list[str]:
    """`git log`-style entries, newest first: three short lines per version."""
    lines = []
    for dataset in datasets:
        lineage, train = dataset.lineage, dataset.split("train")
        marks = [dataset.name]
        if heads.get(dataset.name) == dataset.version:
            marks.append("head")
        if quarantine_record(dataset.path):
            marks.append("QUARANTINED")
        created = lineage.get("created_at", "?")[:16].replace("T", " ")
        parents = ", ".join(lineage.get("parents") or []) or "none"
        lines += [f"version {dataset.version} ({', '.join(marks)})",
                  f"  created {created} UTC by {lineage.get('principal', '?')}; "
                  f"parent {parents}",
                  f"  {train['num_tokens']:,} training tokens, {train['num_documents']:,} "
                  f"documents", ""]
    return lines


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]],
           flexible: str) -> Table:
    """A compact table whose columns keep their full width, except `flexible`, which folds."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for i, column in enumerate(columns):
        width = max([len(column), *(len(row[i]) for row in rows)])
        numeric = any(row[i][:1].isdigit() for row in rows) and column not in (
            "version", "created (UTC)", "parent")
        table.add_column(column, justify="right" if numeric else "left", overflow="fold",
                         min_width=None if column == flexible else width)
    for row in rows:
        table.add_row(*row)
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
                      f"{_counts(info.get('domain_tokens', {}), ', ')}", markup=False,
                      soft_wrap=True)
    _print_chat(console, dataset.chat)
    print_report(console, dataset)
    record = quarantine_record(dataset.path)
    if record:
        console.print(f"[red]quarantined[/]: {', '.join(record['bad_files'])}")


def _print_chat(console: Console, chat: dict | None) -> None:
    """A chat or preference dataset's template, trained tokens and packing, per split."""
    if chat is None:
        return
    console.print(f"{chat.get('kind', 'chat')}: template {chat['template']}, trains "
                  f"{chat['train_on']}, rows of {chat['row_tokens']:,} tokens", markup=False)
    for split, domains in chat["splits"].items():
        for domain, stats in domains.items():
            console.print(f"{split} {domain}: {stats['conversations']:,} in {stats['rows']:,} "
                          f"rows, {stats['truncated']:,} too long, {stats['trained_tokens']:,} "
                          f"trained of {stats['tokens']:,} tokens, {stats['padding_tokens']:,} "
                          "padding", markup=False, soft_wrap=True)
