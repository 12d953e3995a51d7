"""Provenance of exported models: a fingerprint over canonical weight bytes and the training
metadata embedded in every artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from helox.checkpoint import load_trained_model, resolve_checkpoint
from helox.checkpoint.fingerprint import (StoredTensor, model_fingerprint, torch_stored,
                                         weights_fingerprint)
from helox.export.source import ExportSource
from helox.model.hf import hf_to_helox_name

METADATA_PREFIX = "helox."


def training_metadata(source: ExportSource) -> dict[str, str]:
    """What every artifact carries about where its weights came from, as flat string pairs
    (safetensors metadata, GGUF key-values and ONNX metadata_props hold only strings)."""
    info = source.run_info
    init_from = source.config.train.init_from
    values = {
        "model_fingerprint": model_fingerprint(source.model),
        "run_fingerprint": info.get("fingerprint", ""),
        "dataset_version": info.get("dataset_version", ""),
        "config_sha256": info.get("config_sha256", ""),
        "parent_model": info.get("parent_model", str(init_from) if init_from else ""),
        "parent_model_fingerprint": parent_fingerprint(init_from),
        "checkpoint": source.checkpoint.name,
        "weights": "ema" if source.ema else "model",
        "code_version": info.get("code", {}).get("git_sha", info.get("code", {}).get(
            "helox", "")) or "",
    }
    return {METADATA_PREFIX + key: str(value) for key, value in values.items()}


def parent_fingerprint(init_from: Path | None) -> str:
    """The model fingerprint of the checkpoint a run started from (train.init_from), when it
    is still there; "" otherwise."""
    if init_from is None or not Path(init_from).exists():
        return ""
    checkpoint = resolve_checkpoint(init_from, warn=lambda message: None)
    return model_fingerprint(load_trained_model(checkpoint).model)


def numpy_stored(name: str, array: np.ndarray, dtype: str) -> StoredTensor:
    """A numpy array's bytes under the format's type name."""
    return StoredTensor(name, dtype, tuple(array.shape), np.ascontiguousarray(array).tobytes())


def safetensors_stored_tensors(path: Path) -> list[StoredTensor]:
    """The tensors of a .safetensors file as stored: its header's dtype and shape, and the
    exact bytes of each (read from the file, not through a framework)."""
    with open(path, "rb") as f:
        header_bytes = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_bytes))
        data = f.read()
    header.pop("__metadata__", None)
    return [StoredTensor(name, info["dtype"], tuple(info["shape"]),
                         data[info["data_offsets"][0]:info["data_offsets"][1]])
            for name, info in header.items()]


def safetensors_metadata(path: Path) -> dict[str, str]:
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {key: value for key, value in header.get("__metadata__", {}).items()
            if key.startswith(METADATA_PREFIX)}


def model_fingerprint_of_hf(weights: Path) -> str:
    """The model fingerprint of a Hugging Face safetensors file: its tensors under Helox's
    names in fp32 (a tied head is absent from the file, as from the canonical state)."""
    tensors = load_file(str(weights))
    return weights_fingerprint(torch_stored(hf_to_helox_name(name), tensor.to(torch.float32))
                               for name, tensor in tensors.items())
