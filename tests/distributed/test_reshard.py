"""Checkpoints that reshard: model and optimizer saved by 2 FSDP2 (or ZeRO-1) ranks load into
1 process, and saved by 1 process load into 2 FSDP2 ranks; the next 10 steps match the
uninterrupted single-process run (which the 2-rank run matches, tests/distributed/test_maths.py)."""

import pytest
import torch

from helox.testing.distributed import run_distributed
from helox.testing.parallel_maths import resume_from, save_after, train_steps

STOP_AT = 10


@pytest.fixture(scope="module")
def reference():
    return train_steps(None)


def assert_continues(run: dict, reference: dict) -> None:
    torch.testing.assert_close(torch.tensor(run["losses"]),
                               torch.tensor(reference["losses"][STOP_AT:]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(run["grad_norms"]),
                               torch.tensor(reference["grad_norms"][STOP_AT:]), rtol=1e-5,
                               atol=0)
    for name, weight in reference["weights"].items():
        torch.testing.assert_close(run["weights"][name], weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fsdp", "zero1"])
def test_saved_on_two_ranks_resumes_on_one(tmp_path, reference, mode):
    """ZeRO-1's ranks each save the optimizer state of the parameters they own."""
    run_distributed(save_after, 2, (mode, str(tmp_path / "ckpt"), STOP_AT))
    assert_continues(resume_from(None, str(tmp_path / "ckpt"), STOP_AT), reference)


def test_saved_on_one_process_resumes_on_two_ranks(tmp_path, reference):
    save_after(None, str(tmp_path / "ckpt"), STOP_AT)
    for run in run_distributed(resume_from, 2, ("fsdp", str(tmp_path / "ckpt"), STOP_AT)):
        assert_continues(run, reference)
