"""helox.allocator: a training step's large tensors reuse the memory of the step before."""

import resource

import pytest
import torch
import torch.nn.functional as F

from helox import allocator
from helox.allocator import large_tensors_on_heap, reuses_memory

pytestmark = pytest.mark.skipif(not allocator.available(), reason="needs glibc's malloc")


def _faults_per_step(steps: int = 12, measured: int = 8) -> float:
    """Minor page faults of the last `measured` of `steps` forward + backward passes whose
    logits (2,048 × 8,192 fp32, 64 MiB) and their gradient are far above glibc's mmap
    threshold: outside the block each pass faults them in afresh."""
    generator = torch.Generator().manual_seed(0)
    weight_VD = torch.randn(8192, 128, generator=generator, requires_grad=True)
    x_ND = torch.randn(2048, 128, generator=generator)
    targets_N = torch.randint(0, 8192, (2048,), generator=generator)
    counts = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        F.cross_entropy(F.linear(x_ND, weight_VD), targets_N).backward()
        weight_VD.grad = None
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sum(counts[-measured:]) / measured


def test_large_tensors_stop_faulting_in_after_the_first_steps():
    outside = _faults_per_step()
    if outside < 4096:  # e.g. transparent huge pages always on: nothing to save here
        pytest.skip(f"only {outside:.0f} page faults per step without the setting")
    with large_tensors_on_heap() as active:
        inside = _faults_per_step()
    assert active
    # One 64 MiB tensor is 16,384 pages; glibc's aligned allocations settle within a few steps.
    assert inside < 0.3 * outside, (inside, outside)


def test_blocks_nest_and_the_outermost_restores():
    with large_tensors_on_heap() as outer:
        with large_tensors_on_heap() as inner:
            assert inner and allocator._depth == 2
        assert outer and allocator._depth == 1
    assert allocator._depth == 0
    with large_tensors_on_heap(enabled=False) as active:
        assert not active and allocator._depth == 0


def test_only_cpu_runs_reuse_memory():
    assert reuses_memory(True, torch.device("cpu"))
    assert not reuses_memory(False, torch.device("cpu"))
    assert not reuses_memory(True, torch.device("cuda"))
