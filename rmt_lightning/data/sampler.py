"""Curriculum batch sampler over entropy tiers (RMT, section 4)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from rmt_lightning.runtime.errors import InputError
from rmt_lightning.method import TIER_NAMES, renormalise_over_nonempty, rollout_update, tier_probabilities

__all__ = ["CurriculumBatchSampler", "CurriculumSchedule", "DrawRepeats"]


@dataclass(frozen=True)
class DrawRepeats:
    """Which optimizer steps train on one draw of positions (TRL's RepeatSampler idea: the data side repeats a
    draw, so that every counter of the run counts optimizer steps)."""

    single_draw_steps: int = 0
    """The first steps, each with a draw of its own (the format warm-up)."""
    steps_per_draw: int = 1
    """Consecutive steps after them that share one draw (the updates of one rollout)."""


@dataclass(frozen=True)
class CurriculumSchedule:
    """The tier mix at each point of training: RMT's easy-to-hard curriculum (``method.tier_probabilities``), or,
    with ``curriculum`` off, the union of the tiers drawn uniformly (the RPT baseline)."""

    p1: Sequence[float]
    """Tier distribution (easy, medium, hard) before ``t1``."""
    p2: Sequence[float]
    """Tier distribution from ``t1`` up to ``t2``; after ``t2`` the hard tier only."""
    t1: float
    t2: float
    curriculum: bool = True


class CurriculumBatchSampler(Sampler[list[int]]):
    """Draws per-rank batches of candidate ids, tier by tier, following the RMT curriculum.

    Use it as a DataLoader ``batch_sampler``. Keyword arguments:

    - ``tier_candidates``: three 1-D int64 tensors (easy, medium, hard) of dataset
      indices. Ids in no tier are never drawn; empty tiers are skipped by renormalising.
    - ``tier_sizes``: instead of ``tier_candidates``, the number of candidates of each tier, whose ids count
      through the tiers in order (easy's ``0 .. n_easy - 1``, then medium's, then hard's: a ``TierIndex``'s ids).
      The draws are the same as with ``tier_candidates`` listing those ids, and the sampler holds no id.
    - ``batch_size``: items per rank and batch; ``batches_per_epoch``: ``len(self)``.
    - ``schedule``: the tier mix over training (``CurriculumSchedule``).
    - ``seed``, ``rank``, ``world_size``: batch ``b`` of epoch ``e`` comes from an RNG
      seeded by ``(seed, e, b)``; every rank draws the same global batch of
      ``batch_size * world_size`` ids and keeps slice ``[rank*batch_size, (rank+1)*batch_size)``.
    - ``total_batches``: batches of the whole run, for progress
      ``s = min(1, (e * batches_per_epoch + b) / total_batches)``; None means one epoch.
      An attribute, set before iterating.
    - ``repeats``: which batches repeat an earlier one's draw (``DrawRepeats``; default: none). Batch ``b`` of
      epoch ``e`` is the run's step ``t = e * batches_per_epoch + b``; a repeat is the draw of the step that drew
      it (``t - rollout_update(t, ...)``), with that step's progress. An attribute, set before iterating.

    After each yielded batch, ``last_progress``, ``last_probabilities`` (renormalised),
    ``last_tier_counts``, ``last_tiers`` (tier of each yielded id), ``last_drawn_at`` (the step that drew it)
    and ``last_update`` (how many steps after that one it is) describe it.
    """

    def __init__(
        self,
        *,
        tier_candidates: Sequence[Tensor] | None = None,
        tier_sizes: Sequence[int] | None = None,
        batch_size: int,
        batches_per_epoch: int,
        schedule: CurriculumSchedule,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if (tier_candidates is None) == (tier_sizes is None):
            raise ValueError("give exactly one of tier_candidates and tier_sizes")
        given = tier_candidates if tier_candidates is not None else tier_sizes
        if len(given) != len(TIER_NAMES):
            raise ValueError(f"tier_candidates/tier_sizes must hold {len(TIER_NAMES)} entries {TIER_NAMES}, got {len(given)}")
        if tier_candidates is not None and any(t.dim() != 1 for t in tier_candidates):
            shapes = [tuple(t.shape) for t in tier_candidates]
            raise ValueError(f"tier_candidates must be 1-D tensors, got shapes {shapes}")
        if tier_sizes is not None and any(int(n) < 0 for n in tier_sizes):
            raise ValueError(f"tier_sizes must be >= 0, got {list(tier_sizes)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must satisfy 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed!r}")
        if tier_candidates is not None:
            self._tiers = [t.detach().to("cpu", torch.int64).numpy() for t in tier_candidates]
            self._sizes = np.array([len(t) for t in self._tiers], dtype=np.int64)
        else:
            self._tiers = None
            self._sizes = np.array([int(n) for n in tier_sizes], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])
        if self._sizes.sum() == 0:
            raise ValueError("all tiers (easy, medium, hard) are empty: there is no candidate id to sample")
        tier_probabilities(0.0, schedule.p1, schedule.p2, schedule.t1, schedule.t2)  # fail at construction, not mid-training
        self.schedule = schedule
        self.batch_size, self.batches_per_epoch = int(batch_size), int(batches_per_epoch)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.total_batches: int | None = None
        self.repeats = DrawRepeats()
        self.epoch = 0
        self._yielded = 0
        self.last_progress: float = 0.0
        self.last_probabilities: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.last_tier_counts: tuple[int, int, int] = (0, 0, 0)
        self.last_tiers: list[int] = []
        self.last_drawn_at: int = 0
        self.last_update: int = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a different epoch than the current one starts at batch 0."""
        if int(epoch) != self.epoch:
            self._yielded = 0
        self.epoch = int(epoch)

    def progress(self, batch: int, epoch: int | None = None) -> float:
        """Training progress ``s`` in [0, 1] for ``batch`` of ``epoch`` (default: current epoch)."""
        total = self.batches_per_epoch if self.total_batches is None else int(self.total_batches)
        if total < 1:
            raise ValueError(f"total_batches must be >= 1, got {self.total_batches!r}")
        epoch = self.epoch if epoch is None else epoch
        return min(1.0, (epoch * self.batches_per_epoch + batch) / total)

    def probabilities(self, progress: float) -> tuple[float, float, float]:
        """Tier distribution actually sampled from at ``progress``, after dropping empty tiers."""
        schedule = self.schedule
        if not schedule.curriculum:
            return tuple(float(n) for n in self._sizes / self._sizes.sum())  # type: ignore[return-value]
        probs = tier_probabilities(progress, schedule.p1, schedule.p2, schedule.t1, schedule.t2)
        return renormalise_over_nonempty(probs, self._sizes > 0)  # type: ignore[return-value]

    def draw(self, batch: int, epoch: int | None = None) -> tuple[list[int], list[int]]:
        """This rank's (ids, tiers) for ``batch`` of ``epoch``; pure in its arguments."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, batch]))
        n = self.batch_size * self.world_size
        # Positions are drawn without replacement within a global batch (while a tier has enough), so the
        # ranks' shares of a step never hold the same position twice.
        if self.schedule.curriculum:
            probs = np.asarray(self.probabilities(self.progress(batch, epoch)))
            tiers = rng.choice(len(TIER_NAMES), size=n, p=probs / probs.sum())
            within = np.zeros(n, dtype=np.int64)
            for tier in range(len(TIER_NAMES)):
                slots = np.flatnonzero(tiers == tier)
                if len(slots):  # an empty tier has probability 0 and no slots
                    size = int(self._sizes[tier])
                    within[slots] = rng.choice(size, size=len(slots), replace=len(slots) > size)
        else:
            total = int(self._sizes.sum())
            flat = rng.choice(total, size=n, replace=n > total)
            tiers = np.searchsorted(np.cumsum(self._sizes), flat, side="right")
            within = flat - self._starts[tiers]
        if self._tiers is None:
            ids = [int(self._starts[d] + i) for d, i in zip(tiers, within)]
        else:
            ids = [int(self._tiers[d][i]) for d, i in zip(tiers, within)]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return ids[lo:hi], [int(d) for d in tiers[lo:hi]]

    def __iter__(self) -> Iterator[list[int]]:
        start = self._yielded if self._yielded < self.batches_per_epoch else 0
        for b in range(start, self.batches_per_epoch):
            step = self.epoch * self.batches_per_epoch + b
            update = rollout_update(step, self.repeats.single_draw_steps, self.repeats.steps_per_draw)
            epoch, batch = divmod(step - update, self.batches_per_epoch)
            ids, tiers = self.draw(batch, epoch)
            self.last_progress = self.progress(batch, epoch)
            self.last_drawn_at, self.last_update = step - update, update
            self.last_probabilities = self.probabilities(self.last_progress)
            self.last_tiers = tiers
            self.last_tier_counts = tuple(tiers.count(d) for d in range(len(TIER_NAMES)))  # type: ignore[assignment]
            self._yielded = b + 1
            yield ids

    def state_dict(self) -> dict[str, int]:
        """Resume point: current ``epoch``, ``batches_yielded`` within it, ``seed``, and the ``global_batch_size``
        (``batch_size * world_size``) the batches were drawn at."""
        return {"epoch": self.epoch, "batches_yielded": self._yielded, "seed": self.seed,
                "global_batch_size": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``. The seed and the global batch size must match, else the continuation would
        draw other batches; the number of processes may differ (every rank draws the whole global batch)."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"state seed {state['seed']!r} differs from this sampler's seed {self.seed!r}")
        saved = state.get("global_batch_size")  # absent from checkpoints written before it was recorded
        if saved is not None and int(saved) != self.batch_size * self.world_size:
            if int(saved) % self.world_size:
                fix = f"use a number of processes that divides {saved}"
            else:
                fix = f"set data.batch_size {int(saved) // self.world_size} to continue the same curriculum"
            raise InputError(
                f"the checkpoint drew global batches of {saved} positions; this run draws {self.batch_size * self.world_size} "
                f"(batch_size {self.batch_size} x {self.world_size} process(es)): {fix}"
            )
        self.epoch = int(state["epoch"])
        self._yielded = int(state["batches_yielded"])
