"""The streaming loader: packing, shuffling, sharding over ranks and workers, exact resume,
mixture, curriculum, document masks."""

import io
import random
from collections import Counter

import numpy as np
import pytest
import torch

from helox.data.curriculum import CurriculumConfig
from helox.data.loader import (LoaderOptions, TrainLoader, document_positions, fixed_sequences,
                               split_streams, BlockReader)
from helox.data.mixing import MixtureConfig, RebalanceConfig
from helox.errors import HeloxError


def options(**kwargs) -> LoaderOptions:
    defaults = dict(block_len=32, micro_batch_size=4, grad_accum_steps=2, seed=11, max_steps=200)
    return LoaderOptions(**(defaults | kwargs))


def rows(batch) -> list[tuple]:
    return [tuple(r) for r in batch.data.inputs.tolist()]


def all_blocks(dataset, block_len=32) -> Counter:
    streams = split_streams(dataset, "train", block_len)
    reader = BlockReader(streams, block_len, dataset.dtype)
    return Counter(tuple(reader.block(i, b)[:-1].tolist())
                   for i, s in enumerate(streams) for b in range(s.num_blocks))


def fake_losses(step: int, domains: list[str]) -> dict[str, float]:
    """Validation losses that change with the step, so every rebalancing moves the weights."""
    return {d: 1.0 + ((step * 7 + i * 3) % 5) / 2 for i, d in enumerate(domains)}


def drive(loader: TrainLoader, steps: int) -> list:
    """Consume `steps` batches the way the training loop does (rebalancing when due)."""
    batches = []
    for _ in range(steps):
        batch = loader.next_step()
        batches.append(batch)
        if loader.rebalance_due(batch.step + 1):
            loader.rebalance(batch.step + 1, fake_losses(batch.step + 1, loader.domains))
    return batches


def assert_same_batches(expected, actual):
    assert [b.step for b in expected] == [b.step for b in actual]
    for a, b in zip(expected, actual):
        assert a.seq_len == b.seq_len
        for x, y in zip(a.data, b.data):
            assert (x is None and y is None) or torch.equal(x, y)
        assert a.domains == b.domains


def test_targets_are_inputs_shifted_by_one(tiny_dataset):
    batch = TrainLoader(tiny_dataset, options()).next_step()
    inputs, targets = batch.data.inputs, batch.data.targets
    assert inputs.shape == targets.shape == (8, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_order_is_a_function_of_seed(tiny_dataset):
    a = drive(TrainLoader(tiny_dataset, options(seed=1)), 3)
    b = drive(TrainLoader(tiny_dataset, options(seed=1)), 3)
    c = drive(TrainLoader(tiny_dataset, options(seed=2)), 3)
    assert_same_batches(a, b)
    assert rows(a[0]) != rows(c[0])


def test_an_epoch_reads_every_block_once_then_reshuffles(mixed_dataset):
    expected = all_blocks(mixed_dataset)
    num_blocks = sum(expected.values())
    loader = TrainLoader(mixed_dataset, options())
    seen = [r for b in drive(loader, -(-num_blocks // 8) + 1) for r in rows(b)]
    assert Counter(seen[:num_blocks]) == expected
    assert seen[num_blocks:] != seen[:len(seen) - num_blocks]  # the next epoch is reordered


def union_over_ranks_and_workers(dataset, opts: LoaderOptions, world_size: int, steps: int):
    """Global rows of each step, rebuilt from every rank's share (read by its workers)."""
    per_rank = [drive(TrainLoader(dataset, opts, rank=r, world_size=world_size), steps)
                for r in range(world_size)]
    return [[row for rank in range(world_size) for row in rows(per_rank[rank][i])]
            for i in range(steps)]


@pytest.mark.parametrize("weighted", [False, True])
def test_two_ranks_with_two_workers_each_read_the_single_process_epoch(mixed_dataset, weighted):
    mixture = MixtureConfig(weights={"drama": 2, "scripture": 1, "technical": 1, "noise": 0.5}
                            if weighted else {})
    num_blocks = sum(all_blocks(mixed_dataset).values())
    steps = -(-num_blocks // 8)
    single = union_over_ranks_and_workers(mixed_dataset, options(mixture=mixture), 1, steps)
    sharded = union_over_ranks_and_workers(
        mixed_dataset, options(mixture=mixture, num_workers=2), 2, steps)
    flat_single = [r for step in single for r in step][:num_blocks]
    flat_sharded = [r for step in sharded for r in step][:num_blocks]
    assert Counter(flat_sharded) == Counter(flat_single)
    assert sharded == single  # and in the same order, step by step
    if not weighted:
        assert Counter(flat_single) == all_blocks(mixed_dataset)


def resumable_options(num_workers: int) -> LoaderOptions:
    """Rebalancing every 3 steps, a length change, a batch ramp and an injected domain."""
    return options(
        num_workers=num_workers, document_masking=True,
        mixture=MixtureConfig(weights={"drama": 1, "scripture": 1, "technical": 1, "noise": 0},
                              rebalance=RebalanceConfig(every_steps=3, floor=0.05)),
        curriculum=CurriculumConfig(seq_len=[{"from_step": 0, "value": 16},
                                             {"from_step": 7, "value": 32}],
                                    batch_size=[{"from_step": 0, "value": 4},
                                                {"from_step": 5, "value": 8}],
                                    inject=[{"from_step": 4, "domain": "noise", "weight": 0.2}]))


def checkpoint_roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


STOPS = sorted(random.Random(4).sample(range(1, 14), 3))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_after_k_batches_gives_the_remaining_batches(mixed_dataset, num_workers):
    total = 14
    straight = drive(TrainLoader(mixed_dataset, resumable_options(0)), total)
    for stop in STOPS:
        first = TrainLoader(mixed_dataset, resumable_options(num_workers))
        drive(first, stop)
        state = checkpoint_roundtrip(first.state_dict())
        first.close()
        resumed = TrainLoader(mixed_dataset, resumable_options(num_workers))
        resumed.load_state_dict(state)
        assert_same_batches(straight[stop:], drive(resumed, total - stop))


def test_resume_with_another_number_of_workers(mixed_dataset):
    straight = drive(TrainLoader(mixed_dataset, resumable_options(0)), 12)
    first = TrainLoader(mixed_dataset, resumable_options(2))
    drive(first, 5)
    resumed = TrainLoader(mixed_dataset, resumable_options(1))
    resumed.load_state_dict(checkpoint_roundtrip(first.state_dict()))
    assert_same_batches(straight[5:], drive(resumed, 7))


def test_resume_on_two_ranks_continues_the_single_rank_run(mixed_dataset):
    straight = drive(TrainLoader(mixed_dataset, options()), 9)
    first = TrainLoader(mixed_dataset, options())
    drive(first, 4)
    state = first.state_dict()
    halves = []
    for rank in range(2):
        loader = TrainLoader(mixed_dataset, options(), rank=rank, world_size=2)
        loader.load_state_dict(state)
        halves.append(drive(loader, 5))
    for i, batch in enumerate(straight[4:]):
        assert rows(halves[0][i]) + rows(halves[1][i]) == rows(batch)


def test_a_batch_that_does_not_split_over_ranks_is_refused(mixed_dataset):
    with pytest.raises(HeloxError, match="not a multiple of the world size 3"):
        TrainLoader(mixed_dataset, options(), rank=0, world_size=3)


def test_state_from_another_setup_is_refused(mixed_dataset):
    state = TrainLoader(mixed_dataset, options(seed=1)).state_dict()
    with pytest.raises(HeloxError, match="saved seed is 1, this run has 2"):
        TrainLoader(mixed_dataset, options(seed=2)).load_state_dict(state)


def test_realised_proportions_track_the_targets_over_10k_sequences(mixed_dataset):
    targets = {"drama": 0.5, "scripture": 0.3, "technical": 0.15, "noise": 0.05}
    loader = TrainLoader(mixed_dataset, options(block_len=16, micro_batch_size=100,
                                                grad_accum_steps=1,
                                                mixture=MixtureConfig(weights=targets)))
    counts = Counter()
    for batch in drive(loader, 100):
        counts.update(loader.domains[i] for i in batch.domains)
    assert sum(counts.values()) == 10_000
    for domain, target in targets.items():
        assert counts[domain] / 10_000 == pytest.approx(target, abs=0.01)
        assert loader.realised_shares()[loader.domains.index(domain)] == pytest.approx(
            target, abs=0.01)


def test_rebalancing_follows_doremi(mixed_dataset):
    """alpha ∝ alpha · exp(eta · max(L − ref, 0)), then the floor; computed independently."""
    config = RebalanceConfig(every_steps=2, learning_rate=0.5, floor=0.05,
                             reference_loss={"drama": 2.0, "noise": 5.0})
    loader = TrainLoader(mixed_dataset, options(
        mixture=MixtureConfig(weights={"drama": 4, "scripture": 3, "technical": 2, "noise": 1},
                              rebalance=config)))
    alpha = np.array([0.4, 0.1, 0.3, 0.2])  # domains are sorted: drama, noise, scripture, ...
    assert loader.domains == ["drama", "noise", "scripture", "technical"]
    reference = np.array([2.0, 5.0, 0.0, 0.0])
    for update in range(3):
        loader.next_step(), loader.next_step()
        losses = np.array([3.0, 5.5, 2.5, 2.0]) + update
        got = loader.rebalance(loader.step, dict(zip(loader.domains, losses.tolist())))
        alpha = alpha * np.exp(0.5 * np.maximum(losses - reference, 0))
        alpha /= alpha.sum()
        np.testing.assert_allclose(got, (1 - 4 * 0.05) * alpha + 0.05, rtol=1e-12)


def test_rebalancing_happens_once_and_before_the_next_batch(mixed_dataset):
    loader = TrainLoader(mixed_dataset, options(
        mixture=MixtureConfig(rebalance=RebalanceConfig(every_steps=2))))
    loader.next_step()
    with pytest.raises(RuntimeError, match=r"rebalance\(\) after step 1"):
        loader.rebalance(1, fake_losses(1, loader.domains))
    loader.next_step()
    with pytest.raises(RuntimeError, match="rebalancing is due after step 2"):
        loader.next_step()
    loader.rebalance(2, fake_losses(2, loader.domains))
    with pytest.raises(RuntimeError, match="last after step 2"):
        loader.rebalance(2, fake_losses(2, loader.domains))
    assert loader.next_step().step == 2


def test_curriculum_sets_length_and_batch_at_the_configured_steps(mixed_dataset):
    curriculum = CurriculumConfig(seq_len=[{"from_step": 3, "value": 8}],
                                  batch_size=[{"from_step": 0, "value": 2},
                                              {"from_step": 5, "value": 6}])
    batches = drive(TrainLoader(mixed_dataset, options(curriculum=curriculum)), 7)
    assert [b.seq_len for b in batches] == [32, 32, 32, 8, 8, 8, 8]
    assert [b.num_rows for b in batches] == [2, 2, 2, 8, 8, 24, 24]
    # a short length cuts each block into consecutive pieces: the same tokens per step
    assert all(b.data.inputs.numel() == (2 if b.step < 5 else 6) * 32 for b in batches)


def test_curriculum_that_does_not_fit_is_refused():
    problems = CurriculumConfig(seq_len=[{"from_step": 0, "value": 24}],
                                batch_size=[{"from_step": 0, "value": 9}]).problems(32, 8)
    assert any("24 does not divide train.seq_len 32" in p for p in problems)
    assert any("9 exceeds the full batch 8" in p for p in problems)


def test_injected_domain_enters_at_its_step_with_its_share(mixed_dataset):
    curriculum = CurriculumConfig(inject=[{"from_step": 5, "domain": "noise", "weight": 0.25}])
    loader = TrainLoader(mixed_dataset, options(
        curriculum=curriculum, micro_batch_size=8,
        mixture=MixtureConfig(weights={"drama": 1, "scripture": 1, "technical": 2, "noise": 0})))
    noise = loader.domains.index("noise")
    per_step = [b.domains.count(noise) for b in drive(loader, 9)]
    assert per_step[:5] == [0] * 5 and sum(per_step[5:]) == 0.25 * 16 * 4
    assert loader.weights_for(4)[noise] == 0 and loader.weights_for(5)[noise] == 0.25


def test_document_positions_restart_after_every_eos():
    eos = 0
    inputs = np.array([[5, 6, 0, 7, 8, 9, 0, 4], [0, 1, 2, 3, 4, 5, 6, 7]])
    positions, doc_ids = document_positions(inputs, eos)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]


def test_document_masking_makes_packed_documents_independent():
    from helox.model.config import ModelConfig
    from helox.model.llama import Llama

    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=32, d_model=32, num_layers=2, num_heads=4,
                              num_kv_heads=2, max_seq_len=16)).eval()
    first, second = torch.randint(1, 32, (5,)), torch.randint(1, 32, (7,))
    eos = torch.tensor([0])
    packed = torch.cat([first, eos, second, eos])[None]
    positions, doc_ids = (torch.from_numpy(a) for a in document_positions(packed.numpy(), 0))
    with torch.no_grad():
        together = model(packed, positions, doc_ids)
        alone = model(torch.cat([second, eos])[None])
        unmasked = model(packed)
    torch.testing.assert_close(together[:, 6:], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 6:], alone, atol=1e-3)


def test_fixed_sequences_cover_every_validation_domain(mixed_dataset):
    sets = fixed_sequences(mixed_dataset, "val", 32, per_domain=3, document_masking=False)
    assert sorted(sets) == mixed_dataset.domains("val")
    assert all(s.inputs.shape == (3, 32) for s in sets.values())


def test_unknown_or_missing_domain_weights_are_refused(mixed_dataset):
    with pytest.raises(HeloxError, match="does not have: \\['poetry'\\]"):
        TrainLoader(mixed_dataset, options(mixture=MixtureConfig(weights={"poetry": 1})))
    with pytest.raises(HeloxError, match="gives no weight to \\['noise', 'technical'\\]"):
        TrainLoader(mixed_dataset, options(mixture=MixtureConfig(
            weights={"drama": 1, "scripture": 1})))


def test_too_little_data_for_one_batch_is_refused(tiny_dataset):
    with pytest.raises(HeloxError, match="fewer than one batch"):
        TrainLoader(tiny_dataset, options(micro_batch_size=10**6))


def test_another_dataset_is_injected_as_a_stream_of_its_own(mixed_dataset, extra_dataset):
    curriculum = CurriculumConfig(inject=[{"from_step": 2, "dataset": "extra", "weight": 0.25}])
    loader = TrainLoader(mixed_dataset, options(curriculum=curriculum),
                         injected={"extra": extra_dataset})
    extra = loader.domains.index("extra")
    batches = drive(loader, 6)
    assert [b.domains.count(extra) for b in batches] == [0, 0, 2, 2, 2, 2]
    extra_blocks = all_blocks(extra_dataset)
    for batch in batches[2:]:
        for row, stream in zip(rows(batch), batch.domains):
            assert (row in extra_blocks) == (stream == extra)
    assert loader.state_dict()["injected_versions"] == {"extra": extra_dataset.version}


def test_a_dataset_with_another_tokenizer_cannot_be_injected(mixed_dataset, tiny_dataset):
    curriculum = CurriculumConfig(inject=[{"from_step": 0, "dataset": "tiny", "weight": 0.5}])
    with pytest.raises(HeloxError, match="tokenized with another tokenizer") as exc_info:
        TrainLoader(mixed_dataset, options(curriculum=curriculum),
                    injected={"tiny": tiny_dataset})
    assert str(mixed_dataset.tokenizer_path) in exc_info.value.hint


def test_an_injection_names_a_domain_or_a_dataset():
    with pytest.raises(ValueError, match="exactly one of `domain` or `dataset`"):
        CurriculumConfig(inject=[{"from_step": 0, "domain": "a", "dataset": "b", "weight": 0.1}])
