"""Several optimizer steps on one rollout (TRL's ``num_iterations``; PPO's epochs and mini-batches), in one place:
which steps share a draw of positions, the trajectory kept between them with the pi_old and reference log-probs its
later updates read, and its part of a checkpoint.

A rollout feeds ``updates_per_rollout * mini_batches_per_rollout`` optimizer steps. Update ``u`` of a rollout (the
batch's ``rollout_update``, ``method.rollout_update``) trains its mini-batch ``u % M``: ``M`` consecutive steps make
one pass over the rollout. The datamodule repeats the draw for those steps (``DrawRepeats``), so every counter of
the run counts optimizer steps.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..data.sampler import DrawRepeats
from ..method import contiguous_share
from .trajectory import Trajectory

CHECKPOINT_KEY = "rmt_reused_trajectories"
"""Checkpoint key of every rank's kept trajectory (``Trajectory.state_dict`` or None), in rank order."""


class RolloutReuse:
    """The rule and the state of reusing a rollout over ``updates_per_rollout * mini_batches_per_rollout`` steps."""

    def __init__(self, updates_per_rollout: int = 1, mini_batches_per_rollout: int = 1):
        self.updates_per_rollout = updates_per_rollout
        self.mini_batches = mini_batches_per_rollout
        self.kept: Trajectory | None = None
        """The trajectory the next steps of its rollout train on (kept only with several steps per rollout)."""

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps each rollout feeds."""
        return self.updates_per_rollout * self.mini_batches

    @property
    def reuses(self) -> bool:
        """Whether a rollout feeds more than one step (else nothing is kept and pi_old is the current policy)."""
        return self.steps_per_rollout > 1

    def draw_repeats(self, single_draw_steps: int) -> DrawRepeats:
        """Which training steps share a draw of positions, for the datamodule's sampler: each of the first
        ``single_draw_steps`` steps (the format warm-up) draws its own; after them ``steps_per_rollout`` steps
        share one draw."""
        return DrawRepeats(single_draw_steps=single_draw_steps, steps_per_draw=self.steps_per_rollout)

    def trajectory_for(self, drawn_at_step: int | None, collect: Callable[[], Trajectory]) -> tuple[Trajectory, bool]:
        """The trajectory of the draw made at ``drawn_at_step``, and whether ``collect`` just made it: the kept one
        when an earlier step collected it, else a new one, kept while later steps of its rollout remain."""
        if not self.reuses:
            return collect(), True
        kept = self.kept
        # Collected anew whenever the kept one is another draw's, also mid-rollout: after a resume on another
        # number of processes, or where a skipped warm-up step left RL starting inside a rollout's steps.
        fresh = kept is None or drawn_at_step is None or kept.drawn_at_step != drawn_at_step
        if fresh:
            kept = collect()
            kept.drawn_at_step = drawn_at_step
        self.kept = kept
        return kept, fresh

    def mini_batch(self, update: int) -> int:
        """The mini-batch update ``update`` of a rollout trains."""
        return update % self.mini_batches

    def part(self, trajectory: Trajectory, mini_batch: int) -> Trajectory:
        """Mini-batch ``mini_batch`` of ``trajectory``: a contiguous share of its positions, whole groups."""
        return trajectory.positions(contiguous_share(len(trajectory.prompts), self.mini_batches, mini_batch))

    def other_mini_batches(self, mini_batch: int) -> list[int]:
        return [other for other in range(self.mini_batches) if other != mini_batch]

    def old_logprobs(self, trajectory: Trajectory, mini_batch: int, fresh: bool) -> Tensor | None:
        """pi_old of the mini-batch's update: None for one step per rollout (the current policy: ratio 1) and for
        the mini-batch's first update (its own forward gives it, ``record``)."""
        if not self.reuses:
            return None
        old = trajectory.old_logprobs.get(mini_batch)
        if old is None and not fresh:
            old = self.part(trajectory, mini_batch).rollout.logprobs  # kept by a checkpoint written before pi_old came from the loss path
        return old

    def record(self, trajectory: Trajectory, mini_batch: int, update: int, old_logprobs: Tensor | None,
               terms: dict) -> None:
        """Keep what this update's loss computed that later updates of the rollout read: the policy's log-probs as
        pi_old where the mini-batch had none, and the reference's where the mini-batch is trained again. Both are
        popped from ``terms``."""
        policy_logprobs = terms.pop("policy_logprobs")
        reference_logprobs = terms.pop("reference_logprobs", None)
        if self.reuses and old_logprobs is None:
            trajectory.old_logprobs[mini_batch] = policy_logprobs
        if reference_logprobs is not None and update < self.steps_per_rollout - self.mini_batches:
            trajectory.reference_logprobs[mini_batch] = reference_logprobs

    def finish_step(self, update: int) -> None:
        """After update ``update``: the rollout's last step drops the kept trajectory."""
        if update >= self.steps_per_rollout - 1:
            self.kept = None

    def save(self, checkpoint: dict, gather: Callable[[object], list]) -> None:
        """Every rank's kept trajectory in rank order (``gather``: all ranks' objects), so a resume mid-rollout
        trains the updates left on the same completions."""
        if self.reuses:
            checkpoint[CHECKPOINT_KEY] = gather(self.kept.state_dict() if self.kept is not None else None)

    def load(self, checkpoint: dict, rank: int, world_size: int) -> None:
        """This rank's kept trajectory, when the checkpoint holds one written by as many processes; written by
        another number, the ranks' completions belong to other positions: the step collects its rollout again."""
        kept = checkpoint.get(CHECKPOINT_KEY)  # absent from checkpoints of one step per rollout
        if kept is not None and len(kept) == world_size and kept[rank] is not None:
            self.kept = Trajectory.from_state_dict(kept[rank])
