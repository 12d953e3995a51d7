"""`helox export`: one checkpoint → an artifact of one format, with the training metadata
embedded and a signed manifest beside it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from helox.errors import HeloxError
from helox.export.hf import write_hf
from helox.export.manifest import signing_key, write_manifest
from helox.export.onnx import OPSET, build_tensorrt_engine, require_tensorrt, write_onnx
from helox.export.provenance import training_metadata
from helox.export.source import ExportSource, load_export_source
from helox.finetune.lora import BASE_FINGERPRINT_KEY, save_adapter_tensors

EXPORT_FORMATS = ("hf", "onnx", "gguf", "tensorrt", "peft")
"""A LoRA run's hf, onnx, gguf and tensorrt exports hold the merged model; `peft` is its
adapter alone, in PEFT's format, naming its base."""


@dataclass
class Exported:
    format: str
    artifact: Path
    manifest: Path
    metadata: dict[str, str]
    seconds: float
    details: dict


def exports_folder(checkpoint: Path, ema: bool) -> Path:
    """RUN_DIR/exports/<checkpoint>[-ema]: a checkpoint's exports and their parity report."""
    return checkpoint.parent.parent / "exports" / (checkpoint.name + ("-ema" if ema else ""))


def default_out(source: ExportSource, fmt: str, gguf_type: str) -> Path:
    """exports_folder/{hf/, model.onnx, model.engine, model-<type>.gguf}."""
    folder = exports_folder(source.checkpoint, source.ema)
    return folder / {"hf": "hf", "onnx": "model.onnx", "tensorrt": "model.engine",
                     "gguf": f"model-{gguf_type.lower()}.gguf", "peft": "peft"}[fmt]


def export_model(model: Path, fmt: str, out: Path | None = None, gguf_type: str = "F16",
                 ema: bool = False, overwrite: bool = False, key: Path | None = None,
                 announce: Callable[[str], None] = lambda message: None,
                 source: ExportSource | None = None) -> Exported:
    if fmt not in EXPORT_FORMATS:
        raise HeloxError(f"unknown export format '{fmt}'",
                         hint=f"choose one of {', '.join(EXPORT_FORMATS)}")
    gguf_type = gguf_type.upper()
    if fmt == "gguf":
        check_gguf_type(gguf_type)
    if fmt == "tensorrt":  # before the work: without TensorRT there is nothing to build
        require_tensorrt()
    private_key = signing_key(key, announce)  # before the work: a bad key fails fast
    started = time.perf_counter()
    source = source or load_export_source(model, ema=ema, warn=announce)
    out = Path(out) if out is not None else default_out(source, fmt, gguf_type)
    metadata = training_metadata(source)
    if source.adapter is not None:  # what the adapter needs under it (the peft export's key)
        metadata[BASE_FINGERPRINT_KEY] = source.adapter.base_fingerprint
    announce(f"exporting {source.checkpoint} to {fmt}"
             + (f" ({gguf_type})" if fmt == "gguf" else "") + f": {out}")
    artifact, details = write_artifact(source, fmt, out, gguf_type, metadata, overwrite,
                                       announce)
    manifest = write_manifest(artifact, fmt, metadata, private_key, details)
    return Exported(fmt, artifact, manifest, metadata, time.perf_counter() - started, details)


def write_peft(source: ExportSource, out: Path, metadata: dict[str, str]) -> tuple[Path, dict]:
    """The trained adapter as PEFT saves one; `base_model_name_or_path` names the base's
    checkpoint and the weights' metadata its fingerprint (Helox refuses the adapter on
    another base). Stacked adapters stay in their own folders (listed in the details)."""
    adapter = source.adapter
    if adapter is None:
        raise HeloxError(f"{source.checkpoint} is not a LoRA run's checkpoint: it has no "
                         "adapter to export", hint="export it as hf, onnx or gguf")
    save_adapter_tensors(adapter.state, out, adapter.config, str(adapter.base_checkpoint),
                         metadata)
    return out, {"base_checkpoint": str(adapter.base_checkpoint),
                 "base_fingerprint": adapter.base_fingerprint,
                 "stacked_on": [str(path) for path in adapter.config.stack]}


def check_gguf_type(gguf_type: str) -> None:
    """Before any work: the gguf package is there (the import says how to install it) and
    knows the type."""
    from helox.export.gguf import GGUF_TENSOR_TYPES  # optional extra: gguf

    if gguf_type not in GGUF_TENSOR_TYPES:
        raise HeloxError(f"unknown GGUF tensor type '{gguf_type}'",
                         hint=f"choose one of {', '.join(GGUF_TENSOR_TYPES)}")


def write_artifact(source: ExportSource, fmt: str, out: Path, gguf_type: str,
                   metadata: dict[str, str], overwrite: bool,
                   announce: Callable[[str], None]) -> tuple[Path, dict]:
    if fmt != "hf" and out.exists() and not overwrite:
        raise HeloxError(f"{out} exists", hint="choose another --out, or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        return write_hf(source, out, metadata, overwrite=overwrite), {}
    if fmt == "peft":
        return write_peft(source, out, metadata)
    if fmt == "onnx":
        return write_onnx(source, out, metadata, log=announce), {"opset": OPSET}
    if fmt == "tensorrt":
        onnx_path = write_onnx(source, out.with_suffix(".onnx"), metadata, log=announce)
        engine = build_tensorrt_engine(onnx_path, out, log=announce)
        return engine, {"onnx": onnx_path.name, "opset": OPSET}
    from helox.export.gguf import write_gguf  # optional extra: gguf

    return (write_gguf(source, out, gguf_type, metadata, warn=announce),
            {"tensor_type": gguf_type})
