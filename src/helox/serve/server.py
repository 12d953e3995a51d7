"""Starting `helox serve`: open the deployments, build the app, run uvicorn — in the foreground
(the command) or on a thread (tests, the load benchmark)."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import uvicorn
from pydantic import Field

from helox.configbase import StrictModel
from helox.errors import HeloxError
from helox.events import model_event, open_publisher
from helox.platform import load_platform
from helox.registry.store import open_registry
from helox.serve.app import ServeState, build_app, load_adapter
from helox.serve.canary import CanaryConfig, Decision, Router
from helox.serve.deploy import MODELS_SCHEME, Deployment, open_deployment

log = logging.getLogger("helox.serve")


class ServeConfig(StrictModel):
    model: str
    """What to serve: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, a run or checkpoint
    folder, or a Hugging Face folder."""
    candidate: str | None = None
    """A canary candidate, in the same forms; null: no canary."""
    canary: CanaryConfig = CanaryConfig()
    """The split and the automatic rollback's bounds."""
    adapters: dict[str, str] = {}
    """LoRA adapters to load at start: name → PEFT folder or `models:/…` URI."""
    workspace: Path = Path("workspace")
    """Where the registry and the event outbox are."""
    host: str = "127.0.0.1"
    """Address to listen on (loopback by default; 0.0.0.0 exposes it)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port; 0 picks a free one."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when present)."""
    max_batch_size: int = Field(default=8, ge=1)
    """Requests decoded together per engine."""
    naive: bool = False
    """No KV cache, no batching (the benchmark's baseline)."""
    name: str | None = None
    """The model id of a served folder (default: its run's name); a registry version's is its
    registered name."""


@dataclass
class Served:
    """A running server: its URL and what it serves."""

    url: str
    state: ServeState
    server: uvicorn.Server
    deployments: list[Deployment] = field(default_factory=list)


def open_state(config: ServeConfig) -> ServeState:
    """Open what `config` serves (and its canary, its adapters); a rolled-back canary is
    published as `model-rolled-back` (alias `canary`) to the workspace's event bus."""
    kwargs = dict(device=config.device, max_batch_size=config.max_batch_size,
                  naive=config.naive)
    prod = open_deployment(config.model, config.workspace, name=config.name, **kwargs)
    candidate = open_deployment(config.candidate, config.workspace, name=prod.name, **kwargs) \
        if config.candidate else None
    if candidate is not None and candidate.name != prod.name:
        raise HeloxError(f"the canary candidate is {candidate.name}, but prod is {prod.name}: "
                         f"a canary splits one model's traffic between two versions",
                         hint="serve two versions of one registered model (models:/NAME@prod "
                              "and models:/NAME@staging)")

    publisher = open_publisher(load_platform(config.workspace).events, config.workspace)

    def rolled_back(decision: Decision) -> None:
        log.warning("canary of %s rolled back (split set to 0; registry aliases untouched): "
                    "%s", candidate.describe(), decision.reason)
        publisher.publish("model", "model-rolled-back", canary_event(decision, prod, candidate),
                          correlation_id=candidate.source)

    router = Router(prod, candidate, config.canary, rolled_back)
    state = ServeState(router, lambda: open_registry(config.workspace), publisher=publisher)
    for name, path in config.adapters.items():
        load_adapter(state, name, path)
    return state


@contextmanager
def serve_in_thread(state: ServeState, host: str = "127.0.0.1", port: int = 0
                    ) -> Iterator[Served]:
    """Run the app on a thread (port 0: a free one) until the block ends; engines closed."""
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=host, port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="helox-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise HeloxError(f"helox serve did not start on {host}:{port}",
                                 hint="is the port in use? pick another with --port")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield Served(f"http://{host}:{bound}", state, server,
                     [d for _, d in state.router.deployments()])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        close(state)


def serve_forever(state: ServeState, host: str, port: int,
                  announce: Callable[[str], None]) -> None:
    server = uvicorn.Server(uvicorn.Config(build_app(state), host=host, port=port,
                                           log_level="warning", lifespan="off"))
    _log_decisions()
    for role, deployment in state.router.deployments():
        announce(f"{role}: {deployment.describe()}")
    announce(f"listening on http://{host}:{port}/v1 (OpenAI API; Ctrl-C stops)")
    try:
        server.run()
    finally:
        close(state)


def _log_decisions() -> None:
    """The server's own decisions (adapters loaded, the canary's split and rollback) on
    stderr with their time; uvicorn's access log stays off (the metrics count requests)."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def close(state: ServeState) -> None:
    for _, deployment in state.router.deployments():
        deployment.engine.close()
    if state.publisher is not None:
        state.publisher.close()


def canary_event(decision: Decision, prod: Deployment, candidate: Deployment) -> dict:
    """`model-rolled-back` for a canary: traffic went back to prod's version (alias
    `canary`, the candidate as `previous_version`); the registry's aliases did not move."""
    return model_event(
        "model-rolled-back", model_name=prod.name, version=prod.version,
        registry_path=registry_path(prod), alias="canary", previous_version=candidate.version,
        metadata={"scope": "canary", "reason": decision.reason,
                  "candidate": registry_path(candidate), "registry_aliases": "unchanged",
                  "candidate_stats": decision.candidate, "prod_stats": decision.prod})


def registry_path(deployment: Deployment) -> str:
    """`models:/NAME/VERSION` for a registry version, else the folder it was served from."""
    if deployment.source.startswith(MODELS_SCHEME):
        return f"{MODELS_SCHEME}{deployment.name}/{deployment.version}"
    return deployment.source
