"""`helox serve`: an OpenAI-compatible server for a registered or trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from helox.cli.common import WorkspaceOpt, console
from helox.errors import HeloxError


def serve(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="models:/NAME@ALIAS, models:/NAME/VERSION, a run or checkpoint "
                              "folder, or a Hugging Face folder.")],
    canary: Annotated[Optional[str], typer.Option(
        help="A candidate version of the same model (e.g. models:/NAME@staging) that gets "
             "--canary-percent of the users.")] = None,
    canary_percent: Annotated[float, typer.Option(
        min=0, max=100, help="Share of users routed to the candidate (sticky per user).")
    ] = 10.0,
    canary_min_requests: Annotated[int, typer.Option(
        min=1, help="Requests per version before the candidate is judged.")] = 20,
    canary_max_error_increase: Annotated[float, typer.Option(
        help="Roll the canary back when its error rate exceeds prod's by more than this.")
    ] = 0.05,
    canary_max_latency_ratio: Annotated[float, typer.Option(
        help="Roll the canary back when its p95 latency per token exceeds prod's times "
             "this.")] = 2.0,
    adapter: Annotated[Optional[list[str]], typer.Option(
        help="NAME=PATH: a LoRA adapter (PEFT folder or models:/ URI) to load at start "
             "(repeatable).")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Requests decoded together.")
                              ] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    naive: Annotated[bool, typer.Option(
        help="No KV cache and no batching (a baseline for benchmarks).")] = False,
    name: Annotated[Optional[str], typer.Option(
        help="Model id of a served folder (default: its run's name).")] = None,
    workspace: WorkspaceOpt = Path("workspace"),
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions with
    streaming and tool calls, /v1/models), with batching and a KV cache, LoRA adapters loaded
    at runtime (/v1/load_lora_adapter), a canary with automatic rollback (/admin/canary),
    /healthz and /metrics. Stops on Ctrl-C.

    Example: helox serve models:/quickstart@prod --canary models:/quickstart@staging
    """
    try:
        from helox.serve.canary import CanaryConfig
        from helox.serve.server import ServeConfig, open_state, serve_forever
    except ImportError as exc:
        raise HeloxError(f"helox serve needs FastAPI and uvicorn ({exc})",
                         hint="pip install 'helox[serve]' (make demo installs it)") from None

    adapters = {}
    for item in adapter or []:
        adapter_name, sep, path = item.partition("=")
        if not sep or not adapter_name or not path:
            raise HeloxError(f"--adapter {item!r} is not NAME=PATH",
                             hint="e.g. --adapter chat=workspace/runs/sft/exports/"
                                  "step-00000030/peft")
        adapters[adapter_name] = path
    config = ServeConfig(
        model=model, candidate=canary, adapters=adapters, workspace=workspace, host=host,
        port=port, device=device, max_batch_size=max_batch_size, naive=naive, name=name,
        canary=CanaryConfig(percent=canary_percent if canary else 0.0,
                            min_requests=canary_min_requests,
                            max_error_rate_increase=canary_max_error_increase,
                            max_latency_ratio=canary_max_latency_ratio))
    with console.status(f"loading {model}" + (f" and {canary}" if canary else "")):
        state = open_state(config)
    serve_forever(state, host, port, lambda line: console.print(line, highlight=False))
