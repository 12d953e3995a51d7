"""Ranks decide together: a loss spike on one rank's data is judged on the global loss, so
every rank skips the update (and reports the same loss); deciding on local losses instead
lets the replicas diverge, which the comparison catches."""

import pytest
import torch

from helox.testing.distributed import run_distributed
from helox.testing.parallel_maths import spike_on_one_rank


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_spike_on_one_rank_is_skipped_by_every_rank(mode):
    first, second = run_distributed(spike_on_one_rank, 2, (mode, True))
    assert first["reasons"] == second["reasons"] == [None, None, None, "loss_spike", None, None]
    assert first["losses"] == second["losses"]  # the global loss, the same number on each
    assert all(torch.equal(first["weights"][k], second["weights"][k]) for k in first["weights"])


def test_deciding_on_local_losses_lets_the_replicas_diverge():
    first, second = run_distributed(spike_on_one_rank, 2, ("ddp", False))
    assert first["reasons"][3] is None and second["reasons"][3] == "loss_spike"
    assert not all(torch.equal(first["weights"][k], second["weights"][k])
                   for k in first["weights"])
