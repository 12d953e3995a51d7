"""What `helox serve` serves: a registry version (`models:/NAME@ALIAS`, `models:/NAME/VERSION`),
a Helox run or checkpoint folder, or a Hugging Face folder, opened as an `Engine`.

A registered adapter is served on its registered base: the base's `model/` folder is the
engine's model and the adapter (its `exports/peft`) is loaded under the adapter's name, which
is then what requests name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from helox.checkpoint import resolve_checkpoint
from helox.checkpoint.fingerprint import model_fingerprint
from helox.errors import HeloxError
from helox.registry.lineage import EXPORTS_ARTIFACT, TAG_PREFIX
from helox.registry.store import Registry, VersionInfo, open_registry
from helox.serve.engine import Engine

MODELS_SCHEME = "models:/"
HF_CONFIG = "config.json"


@dataclass
class Deployment:
    """One served model version and its engine."""

    name: str
    """The model id requests name (`quickstart`; a registered adapter's own name)."""
    version: str
    """The registry version, else the checkpoint's folder name."""
    source: str
    """What was asked for: `models:/quickstart@prod`, or a path."""
    engine: Engine
    fingerprint: str
    adapter: str | None = None
    """The engine's adapter that `name` selects (a registered adapter); None: its model."""
    eval_gate: str | None = None
    """The version's registered evaluation verdict ("passed"/"failed"); None: not known."""

    def engine_model(self, requested: str) -> str | None:
        """The engine's name for what a request's `model` names (None: the base model)."""
        if requested == self.name:
            return self.adapter
        return requested

    def serves(self, requested: str) -> bool:
        return requested == self.name or requested in self.engine.model_names()

    def describe(self) -> str:
        return f"{self.name} version {self.version} ({self.source})"


def open_deployment(spec: str, workspace: Path, device: str = "auto", name: str | None = None,
                    **engine_kwargs) -> Deployment:
    target = _device(device)
    if spec.startswith(MODELS_SCHEME):
        return _from_registry(spec, open_registry(workspace), target, engine_kwargs)
    path = Path(spec)
    if not path.exists():
        raise HeloxError(f"{spec} is neither a registry URI nor an existing folder",
                         hint="serve models:/NAME@prod, a run folder, a checkpoint folder or "
                              "an exported Hugging Face folder")
    if path.suffix == ".gguf":
        raise HeloxError(f"{spec}: GGUF files are not served by helox serve",
                         hint="serve the run folder or its Hugging Face export; llama.cpp "
                              "serves GGUF files (llama-server)")
    if (path / HF_CONFIG).is_file():
        engine = Engine.from_hf(path, device=target, name=name, **engine_kwargs)
        return Deployment(engine.name, path.name, spec, engine, model_fingerprint(engine.model))
    checkpoint = resolve_checkpoint(path, warn=lambda message: None)
    engine = Engine.from_checkpoint(checkpoint, device=target, name=name, **engine_kwargs)
    return Deployment(engine.name, checkpoint.name, spec, engine,
                      model_fingerprint(engine.model))


def parse_models_uri(spec: str) -> tuple[str, str]:
    """`models:/NAME@ALIAS` → (NAME, "@ALIAS"); `models:/NAME/3` → (NAME, "3")."""
    rest = spec.removeprefix(MODELS_SCHEME)
    name, at, alias = rest.partition("@")
    if at:
        return name, f"@{alias}"
    name, slash, version = rest.partition("/")
    if not slash or not version:
        raise HeloxError(f"{spec} is not a registry URI",
                         hint="write models:/NAME@ALIAS (models:/quickstart@prod) or "
                              "models:/NAME/VERSION")
    return name, version


def registered_adapter_folder(spec: str, registry: Registry) -> tuple[VersionInfo, Path]:
    """A registered adapter's PEFT folder (for `/v1/load_lora_adapter` with a registry URI):
    in the store itself when it is on this disk, else downloaded to a temporary folder."""
    info = registry.version(*parse_models_uri(spec))
    if info.kind != "adapter":
        raise HeloxError(f"{spec} is a full model, not an adapter",
                         hint="serve it with helox serve, or name a registered adapter")
    return info, registry.artifacts(info, parts=(EXPORTS_ARTIFACT,)) / EXPORTS_ARTIFACT / "peft"


def _from_registry(spec: str, registry: Registry, device: torch.device,
                   engine_kwargs: dict) -> Deployment:
    info = registry.version(*parse_models_uri(spec))
    base = info
    if info.kind == "adapter":
        base = registry.version(info.tags[TAG_PREFIX + "base.name"],
                                info.tags[TAG_PREFIX + "base.version"])
    checkpoint = resolve_checkpoint(registry.model_folder(base), warn=lambda message: None)
    engine = Engine.from_checkpoint(checkpoint, device=device, name=base.name, **engine_kwargs)
    deployment = Deployment(info.name, info.version, spec, engine, base.model_fingerprint,
                            eval_gate=_eval_gate(info))
    if info.kind == "adapter":
        _, folder = registered_adapter_folder(f"{MODELS_SCHEME}{info.name}/{info.version}",
                                              registry)
        engine.load_adapter(info.name, folder)
        deployment.adapter, deployment.fingerprint = info.name, info.model_fingerprint
    return deployment


def _eval_gate(info: VersionInfo) -> str | None:
    """"failed" when any registered suite failed, "passed" when all passed, else None."""
    verdicts = [value for key, value in info.lineage().items()
                if key.startswith("eval.") and key.count(".") == 1]
    if not verdicts:
        return None
    return "passed" if all(v == "passed" for v in verdicts) else "failed"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HeloxError(f"--device {name}, but no CUDA device is available",
                         hint="serve with --device cpu or auto")
    return torch.device(name)
