"""glibc's malloc, told to keep a training step's large tensors' memory for the next step.

glibc serves each allocation above its mmap threshold (128 KiB, raised as blocks are freed, to
at most 32 MiB) with a fresh `mmap` and returns it with `munmap` when freed. A training step
allocates and frees the same large tensors every step (logits, scores, activations, their
gradients), so each step page-faults them in again and the kernel zeroes every page first. On
a 2-core Xeon a bf16 (2048, 384) × (384, 8192) matmul took 12.4 ms into a new tensor and 3.9 ms
into a preallocated one. Inside `large_tensors_on_heap()` malloc serves them from its heap and
keeps what is freed (`mallopt`: M_MMAP_MAX 0, M_TRIM_THRESHOLD 2 GiB), so a step reuses the
previous step's pages. The process's resident memory then stays at its peak until the block
ends, as a caching allocator's does.

jemalloc or tcmalloc loaded with LD_PRELOAD do the same (Intel's PyTorch tuning guide
recommends them), but they need a library and a restarted process; `mallopt` is in every
glibc, and can be undone. Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import platform
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
"""mallopt's parameters (malloc.h)."""

AFTER = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20}
"""What is set on leaving: where glibc's own adaptive thresholds end up once large blocks
have been freed (mmap threshold raised to 32 MiB, its maximum; trim threshold twice that).
Its defaults cannot be restored: setting any of these turns the adaptation off for good, and
a fixed 128 KiB mmap threshold would fault twice as many pages per step as glibc's own."""

KEEP = {M_TRIM_THRESHOLD: 2**31 - 1, M_MMAP_MAX: 0}

_lock = threading.Lock()
_depth = 0


def _mallopt():
    """glibc's mallopt, or None where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return getattr(ctypes.CDLL(None), "mallopt", None)


def available() -> bool:
    return _mallopt() is not None


def reuses_memory(enabled: bool, device: torch.device) -> bool:
    """Whether a run with `train.reuse_memory: enabled` on `device` keeps freed memory: on a
    CPU with glibc (a CUDA run's large tensors live in PyTorch's own caching allocator)."""
    return enabled and device.type == "cpu" and available()


@contextmanager
def large_tensors_on_heap(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the process for reuse (see the module); yields
    whether that is in effect (False where disabled or not glibc). Nested blocks share the
    outermost one's setting, which the outermost restores."""
    global _depth
    mallopt = _mallopt() if enabled else None
    if mallopt is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _set(mallopt, KEEP)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _set(mallopt, AFTER)


def _set(mallopt, values: dict[int, int]) -> None:
    for parameter, value in values.items():
        if mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            raise OSError(f"mallopt({parameter}, {value}) failed")
