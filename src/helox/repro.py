"""Reproducibility: one call seeds everything; RNG states round-trip; run fingerprints."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from helox.fileio import sha256_json

FINGERPRINT_LIBRARIES = ("torch", "numpy", "tokenizers", "safetensors", "pydantic", "helox")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device); optionally force deterministic
    kernels (CUDA needs CUBLAS_WORKSPACE_CONFIG for that, set here if absent).

    Deterministic mode also makes torch.compile pick deterministic lowerings (e.g. the embedding
    gradient's scatter-add, which inductor otherwise runs with parallel atomic adds)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Filling every new tensor with NaN only helps find reads of uninitialised memory.
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict:
    """Every global RNG state, as tensors and plain types (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def code_version() -> dict:
    """Git sha and dirty flag of the Helox checkout, or only the package version if installed."""
    version = {"helox": _package_version("helox")}
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        sha = _git(repo, "rev-parse", "HEAD")
        if sha:
            version["git_sha"] = sha
            version["git_dirty"] = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
    return version


def hardware() -> dict:
    info = {"machine": platform.machine(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i)
                                for i in range(torch.cuda.device_count())]
    return info


def run_fingerprint(config_sha256: str, dataset_version: str) -> dict:
    """What identifies a run: config, data, code, libraries, hardware, and their hash."""
    parts = {
        "config_sha256": config_sha256,
        "dataset_version": dataset_version,
        "code": code_version(),
        "libraries": {name: _package_version(name) for name in FINGERPRINT_LIBRARIES},
        "python": platform.python_version(),
        "hardware": hardware(),
    }
    return {"fingerprint": sha256_json(parts), **parts}


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
