import pytest
import torch

from helox.data.loader import PackedLoader
from helox.errors import HeloxError


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_targets_are_inputs_shifted_by_one(tiny_dataset):
    inputs, targets = PackedLoader(tiny_dataset, "train", 16, 4, seed=0).next_batch()
    assert inputs.shape == targets.shape == (4, 16) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_order_is_a_function_of_seed(tiny_dataset):
    a = batches(PackedLoader(tiny_dataset, "train", 16, 4, seed=1), 5)
    b = batches(PackedLoader(tiny_dataset, "train", 16, 4, seed=1), 5)
    c = batches(PackedLoader(tiny_dataset, "train", 16, 4, seed=2), 5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_an_epoch_visits_every_block_once_then_reshuffles(tiny_dataset):
    loader = PackedLoader(tiny_dataset, "val", 16, 1, seed=3)
    n = loader.num_blocks
    first = {tuple(loader.next_batch()[0][0].tolist()) for _ in range(n)}
    sequential = PackedLoader(tiny_dataset, "val", 16, 1, seed=3, shuffle=False)
    assert first == {tuple(sequential.next_batch()[0][0].tolist()) for _ in range(n)}
    assert loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1 and loader.position == 1


@pytest.mark.parametrize("stop_after", [0, 3, 11])
def test_resume_from_state_dict_gives_the_same_remaining_batches(tiny_dataset, stop_after):
    straight = PackedLoader(tiny_dataset, "val", 16, 3, seed=5)
    expected = batches(straight, 20)
    first = PackedLoader(tiny_dataset, "val", 16, 3, seed=5)
    batches(first, stop_after)
    resumed = PackedLoader(tiny_dataset, "val", 16, 3, seed=5)
    resumed.load_state_dict(first.state_dict())
    rest = batches(resumed, 20 - stop_after)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(expected[stop_after:], rest))


def test_state_from_another_setup_is_refused(tiny_dataset):
    state = PackedLoader(tiny_dataset, "train", 16, 4, seed=1).state_dict()
    with pytest.raises(HeloxError, match="saved seq_len is 16"):
        PackedLoader(tiny_dataset, "train", 32, 4, seed=1).load_state_dict(state)


def test_too_little_data_is_a_clear_error(tiny_dataset):
    with pytest.raises(HeloxError, match="fewer than one batch"):
        PackedLoader(tiny_dataset, "val", 16, 10**6, seed=0)
