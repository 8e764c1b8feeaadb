"""``RolloutReuse`` and ``CompletionBatch`` on hand-built trajectories (no model): which trajectory a step trains on,
which mini-batch, what pi_old it reads and keeps, when the kept one is dropped, and its checkpoint part."""

from __future__ import annotations

import torch

from rmt_lightning.data.sampler import DrawRepeats
from rmt_lightning.engine.forward import CompletionBatch
from rmt_lightning.engine.generation import Rollout
from rmt_lightning.rl.reuse import CHECKPOINT_KEY, RolloutReuse
from rmt_lightning.rl.trajectory import Trajectory

P, G, C = 4, 2, 3


def trajectory(seed: int = 0, with_logprobs: bool = False) -> Trajectory:
    """``P`` positions with ``G`` completions of ``C`` tokens each; every value tells its row apart."""
    rows = P * G
    ids = torch.arange(rows * C).reshape(rows, C) + 100 * seed
    rollout = Rollout(ids, torch.ones(rows, C, dtype=torch.bool), torch.ones(rows, C, dtype=torch.bool),
                      [f"row {r}" for r in range(rows)], list(range(rows)), [False] * rows, [False] * rows,
                      -torch.rand(rows, C) if with_logprobs else None)
    rewards = torch.arange(P * G, dtype=torch.float32).reshape(P, G)
    return Trajectory([[p, p + 1] for p in range(P)], rollout, rewards, rewards / 10, rewards / 100,
                      torch.arange(rows, dtype=torch.float32))


def test_one_step_per_rollout_collects_every_time_and_keeps_nothing():
    reuse = RolloutReuse()
    made = []
    first, fresh = reuse.trajectory_for(0, lambda: made.append(1) or trajectory())
    second, _ = reuse.trajectory_for(0, lambda: made.append(1) or trajectory())
    assert fresh and len(made) == 2 and first is not second and reuse.kept is None
    assert not reuse.reuses and reuse.old_logprobs(first, 0, fresh=True) is None
    assert reuse.draw_repeats(3) == DrawRepeats(single_draw_steps=3, steps_per_draw=1)


def test_the_steps_of_a_draw_share_its_trajectory_until_the_last_one():
    reuse = RolloutReuse(updates_per_rollout=2, mini_batches_per_rollout=2)
    assert reuse.steps_per_rollout == 4 and reuse.draw_repeats(1) == DrawRepeats(1, 4)
    collected = []

    def collect():
        collected.append(trajectory(len(collected)))
        return collected[-1]

    seen = []
    for step in range(1, 9):  # after one warm-up step: steps 1-4 draw at 1, 5-8 at 5
        drawn_at, update = step - (step - 1) % 4, (step - 1) % 4
        kept, fresh = reuse.trajectory_for(drawn_at, collect)
        seen.append((kept.drawn_at_step, fresh, reuse.mini_batch(update)))
        reuse.finish_step(update)
        assert (reuse.kept is None) == (update == 3)
    assert len(collected) == 2
    assert seen == [(1, True, 0), (1, False, 1), (1, False, 0), (1, False, 1),
                    (5, True, 0), (5, False, 1), (5, False, 0), (5, False, 1)]


def test_another_draw_is_collected_even_mid_rollout():
    reuse = RolloutReuse(updates_per_rollout=2)
    reuse.trajectory_for(4, trajectory)
    kept, fresh = reuse.trajectory_for(6, lambda: trajectory(1))  # e.g. a resume on another number of processes
    assert fresh and kept.drawn_at_step == 6 and int(kept.rollout.completion_ids[0, 0]) == 100


def test_mini_batches_are_contiguous_whole_groups():
    reuse = RolloutReuse(mini_batches_per_rollout=2)
    whole = trajectory()
    halves = [reuse.part(whole, m) for m in (0, 1)]
    assert [h.prompts for h in halves] == [whole.prompts[:2], whole.prompts[2:]]
    assert torch.equal(halves[1].rollout.completion_ids, whole.rollout.completion_ids[4:])
    assert torch.equal(halves[1].advantages, whole.advantages[4:]) and torch.equal(halves[1].rewards, whole.rewards[2:])
    assert reuse.other_mini_batches(1) == [0]


def test_pi_old_is_recorded_once_and_the_reference_only_while_the_mini_batch_is_trained_again():
    reuse = RolloutReuse(updates_per_rollout=2, mini_batches_per_rollout=2)
    kept = trajectory()
    policy, reference = torch.full((4, C), -1.0), torch.full((4, C), -2.0)
    assert reuse.old_logprobs(kept, 0, fresh=True) is None  # its own forward gives it
    terms = {"loss_rl": 0.5, "policy_logprobs": policy, "reference_logprobs": reference}
    reuse.record(kept, 0, update=0, old_logprobs=None, terms=terms)
    assert terms == {"loss_rl": 0.5}  # popped
    assert kept.old_logprobs[0] is policy and kept.reference_logprobs[0] is reference
    assert reuse.old_logprobs(kept, 0, fresh=False) is policy

    later = {"policy_logprobs": torch.zeros(4, C), "reference_logprobs": torch.zeros(4, C)}
    reuse.record(kept, 0, update=2, old_logprobs=policy, terms=later)  # the last pass: nothing is trained again
    assert kept.old_logprobs[0] is policy and kept.reference_logprobs[0] is reference


def test_a_trajectory_kept_by_an_older_checkpoint_reads_its_recorded_logprobs_as_pi_old():
    reuse = RolloutReuse(mini_batches_per_rollout=2)
    kept = trajectory(with_logprobs=True)
    assert torch.equal(reuse.old_logprobs(kept, 1, fresh=False), kept.rollout.logprobs[4:])
    assert reuse.old_logprobs(kept, 1, fresh=True) is None


def test_the_checkpoint_part_round_trips_for_the_same_number_of_processes_only():
    reuse = RolloutReuse(updates_per_rollout=2)
    reuse.kept = trajectory()
    reuse.kept.drawn_at_step = 7
    checkpoint: dict = {}
    reuse.save(checkpoint, gather=lambda state: [state, None])  # two ranks: rank 1 keeps nothing
    restored = RolloutReuse(updates_per_rollout=2)
    restored.load(checkpoint, rank=0, world_size=2)
    assert restored.kept.drawn_at_step == 7
    assert torch.equal(restored.kept.rollout.completion_ids, reuse.kept.rollout.completion_ids)
    for rank, world_size in ((1, 2), (0, 3)):
        other = RolloutReuse(updates_per_rollout=2)
        other.load(checkpoint, rank=rank, world_size=world_size)
        assert other.kept is None
    single: dict = {}
    RolloutReuse().save(single, gather=lambda state: [state])
    assert CHECKPOINT_KEY not in single  # one step per rollout writes nothing


def test_completion_batches_cut_into_whole_groups():
    rows = P * G
    batch = CompletionBatch(torch.arange(P * 2).reshape(P, 2), torch.ones(P, 2), torch.arange(rows * C).reshape(rows, C),
                            torch.ones(rows, C), torch.eye(rows, C).bool(), group_size=G)
    parts = list(batch.groups(micro_batch_size=3))  # 3 completions: one whole group of 2 per pass
    assert [rows for rows, _ in parts] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert torch.equal(parts[1][1].prompt_ids, batch.prompt_ids[1:2])
    assert torch.equal(parts[1][1].completion_ids, batch.completion_ids[2:4])
    assert torch.equal(parts[1][1].scored(), batch.scored_mask[2:4])
    assert [r for r, _ in batch.groups(micro_batch_size=100)] == [slice(0, rows)]
    unscored = CompletionBatch(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, None, G)
    assert torch.equal(unscored.scored(), batch.completion_mask.bool())
