"""Tests for the curriculum batch sampler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rmt_lightning.runtime.errors import InputError
from rmt_lightning.data.sampler import CurriculumBatchSampler, CurriculumSchedule, DrawRepeats
from rmt_lightning.method import assign_tiers, tier_probabilities

P1, P2, T1, T2 = (0.6, 0.3, 0.1), (0.1, 0.3, 0.6), 0.3, 0.7


def _entropies() -> torch.Tensor:
    # 20 never-candidates, then 30 easy, 20 medium, 10 hard, shuffled so ids do not reveal tiers.
    values = torch.cat([torch.full((20,), 0.2), torch.full((30,), 0.8), torch.full((20,), 1.2), torch.full((10,), 2.0)])
    return values[torch.randperm(len(values), generator=torch.Generator().manual_seed(1))]


def _tiers(entropy: torch.Tensor) -> list[torch.Tensor]:
    tier = assign_tiers(entropy)
    return [torch.nonzero(tier == d).flatten() for d in range(3)]


def _sampler(total_batches=None, repeats=None, curriculum=True, **overrides) -> CurriculumBatchSampler:
    kwargs = dict(tier_candidates=_tiers(_entropies()), batch_size=4, batches_per_epoch=10,
                  schedule=CurriculumSchedule(P1, P2, T1, T2, curriculum))
    kwargs.update(overrides)
    sampler = CurriculumBatchSampler(**kwargs)
    sampler.total_batches = total_batches
    if repeats is not None:
        sampler.repeats = repeats
    return sampler


def _frequencies(sampler: CurriculumBatchSampler, batch: int) -> list[float]:
    _, tiers = sampler.draw(batch)
    return [tiers.count(d) / len(tiers) for d in range(3)]


@pytest.mark.parametrize("batch", [0, 5, 10])
def test_tier_frequencies_follow_curriculum(batch: int) -> None:
    sampler = _sampler(batch_size=20000, total_batches=10)
    expected = tier_probabilities(batch / 10, P1, P2, T1, T2)
    assert sampler.progress(batch) == pytest.approx(batch / 10)
    assert _frequencies(sampler, batch) == pytest.approx(expected, abs=0.015)


def test_drawn_ids_are_candidates_of_their_tier() -> None:
    entropy = _entropies()
    tier = assign_tiers(entropy)
    sampler = _sampler(batch_size=50)
    for ids in sampler:
        assert all(entropy[i] > 0.5 for i in ids)
        assert [int(tier[i]) for i in ids] == sampler.last_tiers
        assert sum(sampler.last_tier_counts) == 50
        assert sum(sampler.last_probabilities) == pytest.approx(1.0)


def test_empty_tier_is_renormalised_away() -> None:
    tiers = _tiers(_entropies())
    sampler = _sampler(tier_candidates=[tiers[0], torch.empty(0, dtype=torch.int64), tiers[2]], batch_size=20000)
    freq = _frequencies(sampler, 0)
    assert freq[1] == 0.0
    assert freq == pytest.approx([0.6 / 0.7, 0.0, 0.1 / 0.7], abs=0.015)
    next(iter(sampler))
    assert sampler.last_probabilities == pytest.approx((0.6 / 0.7, 0.0, 0.1 / 0.7))


def test_all_tiers_empty_raises() -> None:
    empty = torch.empty(0, dtype=torch.int64)
    with pytest.raises(ValueError, match="empty"):
        _sampler(tier_candidates=[empty, empty, empty])


@pytest.mark.parametrize(
    "overrides, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batches_per_epoch": 0}, "batches_per_epoch"),
        ({"rank": 2, "world_size": 2}, "rank"),
    ],
)
def test_invalid_arguments(overrides: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        _sampler(**overrides)


def test_uniform_mode_is_proportional_to_tier_sizes() -> None:
    sampler = _sampler(batch_size=20000, curriculum=False, total_batches=1)
    assert _frequencies(sampler, 0) == pytest.approx([0.5, 1 / 3, 1 / 6], abs=0.015)
    assert sampler.probabilities(1.0) == pytest.approx((0.5, 1 / 3, 1 / 6))


def test_same_seed_same_batches_other_seed_differs() -> None:
    assert list(_sampler(seed=3)) == list(_sampler(seed=3))
    assert list(_sampler(seed=3)) != list(_sampler(seed=4))
    sampler = _sampler()
    sampler.set_epoch(1)
    assert list(sampler) != list(_sampler())


def test_state_dict_resumes_mid_epoch() -> None:
    reference = _sampler(total_batches=30)
    reference.set_epoch(1)
    expected = list(reference)
    original = _sampler(total_batches=30)
    original.set_epoch(1)
    it = iter(original)
    head = [next(it) for _ in range(4)]
    resumed = _sampler(total_batches=30)
    resumed.load_state_dict(original.state_dict())
    resumed.set_epoch(1)
    assert original.state_dict() == {"epoch": 1, "batches_yielded": 4, "seed": 0, "global_batch_size": 4}
    assert head + list(resumed) == expected
    assert resumed.last_progress == pytest.approx(19 / 30)


def _yielded(sampler: CurriculumBatchSampler, epoch: int, count: int | None = None) -> list[tuple]:
    """Epoch ``epoch``'s next ``count`` batches (all that are left: None) with what the sampler says of each."""
    sampler.set_epoch(epoch)
    out = []
    for ids in sampler:
        out.append((ids, sampler.last_progress, sampler.last_drawn_at, sampler.last_update))
        if len(out) == count:
            break
    return out


def test_repeated_draws_are_the_drawing_steps_own_at_its_progress_and_resume_mid_rollout() -> None:
    """One single-draw step, then 3 steps per draw over 2 epochs of 10: step t trains the draw that step
    t - (t - 1) % 3 makes without repeats, at that step's progress, across the epoch boundary (steps 19-21) too;
    a sampler resumed inside a rollout's steps (after step 13 of 13-15) goes on with the same draws."""
    plain = _sampler(total_batches=20)
    expected = [(ids, progress) for epoch in range(2) for ids, progress, _, _ in _yielded(plain, epoch)]
    repeats = DrawRepeats(single_draw_steps=1, steps_per_draw=3)
    drawn_at = [0, *[t - (t - 1) % 3 for t in range(1, 20)]]

    uninterrupted = _sampler(total_batches=20, repeats=repeats)
    seen = _yielded(uninterrupted, 0) + _yielded(uninterrupted, 1)
    assert [(at, update) for _, _, at, update in seen] == [(at, t - at) for t, at in enumerate(drawn_at)]
    assert [(ids, progress) for ids, progress, _, _ in seen] == [expected[at] for at in drawn_at]

    interrupted = _sampler(total_batches=20, repeats=repeats)
    head = _yielded(interrupted, 0) + _yielded(interrupted, 1, count=4)
    resumed = _sampler(total_batches=20, repeats=repeats)
    resumed.load_state_dict(interrupted.state_dict())
    assert head + _yielded(resumed, 1) == seen


def test_state_dict_at_epoch_boundary_starts_next_epoch_at_zero() -> None:
    original = _sampler(total_batches=30)
    list(original)
    state = original.state_dict()
    assert state["batches_yielded"] == 10
    original.set_epoch(1)
    expected = list(original)
    resumed = _sampler(total_batches=30)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert list(resumed) == expected
    assert len(expected) == 10


def test_two_ranks_partition_single_process_draw() -> None:
    single = list(_sampler(batch_size=8))
    rank0 = list(_sampler(batch_size=4, rank=0, world_size=2))
    rank1 = list(_sampler(batch_size=4, rank=1, world_size=2))
    for whole, a, b in zip(single, rank0, rank1, strict=True):
        assert a + b == whole


def test_len_and_dataloader() -> None:
    sampler = _sampler()
    assert len(sampler) == 10
    dataset = TensorDataset(torch.arange(80))
    loader = DataLoader(dataset, batch_sampler=sampler)
    batches = [batch[0] for batch in loader]
    assert len(batches) == len(loader) == 10
    assert all(b.shape == (4,) for b in batches)
    assert batches[-1].tolist() == list(_sampler())[-1]


def test_state_resumes_on_another_number_of_processes_with_the_same_global_batch() -> None:
    """Two ranks of 2 stopped after 3 batches; one process of 4 continues with the same global batches, and
    the reverse."""
    two = [_sampler(batch_size=2, rank=r, world_size=2, total_batches=30) for r in range(2)]
    for sampler in two:
        it = iter(sampler)
        for _ in range(3):
            next(it)
    one = _sampler(batch_size=4, total_batches=30)
    one.load_state_dict(two[0].state_dict())
    expected = [a + b for a, b in zip(*(list(s) for s in two))]
    assert list(one) == expected
    back = [_sampler(batch_size=2, rank=r, world_size=2, total_batches=30) for r in range(2)]
    for sampler in back:
        sampler.load_state_dict({"epoch": 0, "batches_yielded": 3, "seed": 0, "global_batch_size": 4})
    assert [a + b for a, b in zip(*(list(s) for s in back))] == expected


@pytest.mark.parametrize(("batch_size", "world_size", "message"), [
    (2, 1, r"the checkpoint drew global batches of 4 positions; this run draws 2 \(batch_size 2 x 1 process\(es\)\): "
           r"set data.batch_size 4 to continue the same curriculum"),
    (1, 3, r"draws 3 \(batch_size 1 x 3 process\(es\)\): use a number of processes that divides 4"),
])
def test_state_from_another_global_batch_size_is_refused_with_the_fix(batch_size, world_size, message) -> None:
    sampler = _sampler(batch_size=batch_size, world_size=world_size, total_batches=30)
    with pytest.raises(InputError, match=message):
        sampler.load_state_dict({"epoch": 0, "batches_yielded": 3, "seed": 0, "global_batch_size": 4})


def test_state_without_a_recorded_global_batch_size_still_loads() -> None:
    sampler = _sampler(total_batches=30)
    sampler.load_state_dict({"epoch": 1, "batches_yielded": 2, "seed": 0})
    assert sampler.state_dict()["batches_yielded"] == 2


def test_tier_sizes_draw_the_same_positions_as_the_tier_tables_without_holding_an_id() -> None:
    """A ``TierIndex`` names candidates by counting through the tiers; a sampler given only the sizes draws, batch
    for batch, the same candidates as one given the tables (uniform and curriculum, over several ranks)."""
    tables = _tiers(_entropies())
    order = torch.cat(tables)  # id k of the sizes' numbering is candidate order[k] of the tables'
    for curriculum in (True, False):
        for rank in (0, 1):
            common = dict(batch_size=8, curriculum=curriculum, rank=rank, world_size=2, total_batches=10)
            by_tables = _sampler(**common)
            by_sizes = _sampler(tier_candidates=None, tier_sizes=[len(t) for t in tables], **common)
            assert by_sizes._tiers is None
            for from_tables, from_sizes in zip(by_tables, by_sizes, strict=True):
                assert [int(order[i]) for i in from_sizes] == from_tables
                assert by_sizes.last_tiers == by_tables.last_tiers
    with pytest.raises(ValueError, match="exactly one"):
        _sampler(tier_sizes=[1, 2, 3])
