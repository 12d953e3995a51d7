"""The parallel section: degrees that do not multiply to the world size, a global batch that
does not divide across the data-parallel ranks, and ZeRO-1 with sharded parameters are errors
naming both numbers."""

import pytest
from pydantic import ValidationError

from helox.distributed.config import ParallelConfig


def test_degrees_fill_the_world_or_say_which_numbers_disagree():
    assert ParallelConfig().degrees(4) == (1, 4)  # FSDP2 over every rank by default
    assert ParallelConfig(dp_replicate=2).degrees(4) == (2, 2)  # HSDP
    assert ParallelConfig(dp_replicate=4, zero1=True).degrees(4) == (4, 1)
    with pytest.raises(ValueError, match=r"dp_replicate \(2\) × parallel.dp_shard \(3\) must "
                                         r"equal the world size \(4\)"):
        ParallelConfig(dp_replicate=2, dp_shard=3).degrees(4)
    with pytest.raises(ValueError, match="zero1 .* but parallel.dp_shard is 2"):
        ParallelConfig(zero1=True).degrees(2)


def test_the_global_batch_must_divide_across_data_parallel_ranks():
    assert ParallelConfig().per_rank_batch(16, 4) == 4
    with pytest.raises(ValueError, match="global batch of 6 sequences does not divide across 4"):
        ParallelConfig().per_rank_batch(6, 4)


def test_unknown_keys_and_backends_are_refused():
    with pytest.raises(ValidationError):
        ParallelConfig(tensor=2)
    with pytest.raises(ValidationError):
        ParallelConfig(backend="mpi")
