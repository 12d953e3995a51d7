"""What the machine can do fast, for choices that depend on it (precision), and the ceilings
and counters the training metrics report against (MFU, memory)."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run several times faster than fp32 (bench/)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, reps: int = 8,
                       shape: tuple[int, int, int] = (1024, 384, 1536)) -> float:
    """FLOP/s of F.linear of (m×k) by (n×k) in `dtype`, by default a transformer-like shape
    (1024×384 by 1536×384): the ceiling MFU is measured against (a datasheet peak means little
    on a shared CPU). ~0.1 s on CPU at the default shape; a GPU needs a larger one."""
    generator = torch.Generator().manual_seed(0)
    m, k, n = shape
    x_MK = torch.randn(m, k, generator=generator).to(device, dtype)
    w_NK = torch.randn(n, k, generator=generator).to(device, dtype)
    F.linear(x_MK, w_NK)  # warm-up: kernel selection, allocation
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(reps):
        F.linear(x_MK, w_NK)
    _synchronize(device)
    return 2 * m * k * n * reps / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory so far: the process's resident set on CPU, allocated tensors on CUDA (no
    device sync either way)."""
    if device.type == "cuda":
        return {"memory_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"memory_peak_mib": peak_kib / 1024}
