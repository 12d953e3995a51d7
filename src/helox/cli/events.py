"""`helox events`: the workspace's event outbox (what was published, what waits for Redis)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from helox.cli.common import JsonOpt, WorkspaceOpt, emit, out

events_app = typer.Typer(
    help="Synapse events: the workspace's outbox and its delivery to Redis Streams "
         "(docs/events.md).\n\nExample: helox events status", no_args_is_help=True)


@events_app.command("status")
def status(workspace: WorkspaceOpt = Path("workspace"), as_json: JsonOpt = False) -> None:
    """Count the outbox's events: delivered, waiting for Redis, kept locally; and the event at
    the head of the queue with its last delivery error.

    Example: helox events status -w workspace
    """
    from helox.events import outbox_status

    found = outbox_status(workspace)

    def show() -> None:
        out.print(f"{found.path}: {found.total} events, {found.delivered} delivered to Redis, "
                  f"{found.pending} waiting, {found.local} kept locally (no Redis configured)",
                  highlight=False)
        head = found.oldest_pending
        if head is not None:
            out.print(f"next: #{head.seq} {head.event} on {head.stream} from {head.created_at}"
                      f", {head.attempts} attempts"
                      + (f", last error: {head.last_error}" if head.last_error else ""),
                      highlight=False, markup=False)
    emit(as_json, asdict(found), show)


@events_app.command("drain")
def drain_cmd(workspace: WorkspaceOpt = Path("workspace"),
              timeout_s: Annotated[float, typer.Option(
                  "--timeout-s", min=0, help="Give up after this many seconds.")] = 10.0,
              as_json: JsonOpt = False) -> None:
    """Deliver the events waiting in the outbox to Redis, in order, each once (exit 1 when
    some are still waiting, e.g. Redis is down).

    Example: helox events drain --timeout-s 30
    """
    from helox.events import drain
    from helox.platform import load_platform

    done = drain(workspace, load_platform(workspace).events, timeout_s)
    emit(as_json, asdict(done), lambda: out.print(
        f"{done.delivered} delivered, {done.duplicates} already in Redis, {done.pending} "
        f"waiting" + (f" ({done.error})" if done.error else ""), highlight=False,
        markup=False))
    if done.pending:
        raise typer.Exit(1)
