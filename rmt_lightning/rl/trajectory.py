"""Trajectory: what one RL step collected, from the prompts to the advantages, as the losses and the metrics
read it and as a checkpoint keeps it when later steps reuse the rollout."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor

from ..engine.generation import Rollout


@dataclass
class Trajectory:
    """What one RL step collected, from the prompts to the advantages (``P`` positions, ``G`` completions each)."""

    prompts: list[list[int]]
    """Prompt token ids, one per position."""
    rollout: Rollout
    """The ``P * G`` completions; row ``i`` answers prompt ``i // G``."""
    rewards: Tensor
    """``[P, G]`` total reward."""
    correct: Tensor
    """``[P, G]`` correctness part."""
    length: Tensor
    """``[P, G]`` length part (next-token task); for the question task, whether each completion gave a
    ``\\boxed{}`` answer (the format part before its weight)."""
    advantages: Tensor
    """``[P * G]`` group-normalised advantages."""
    drawn_at_step: int | None = None
    """The run's step that drew the positions (``PositionBatch.drawn_at_step``): which rollout this is."""
    reference_logprobs: dict[int, Tensor] = field(default_factory=dict)
    """The reference model's log-probs ``[rows, C]`` of each mini-batch's completions, by mini-batch, from its
    first update; the rollout's later updates reuse them instead of running the frozen reference again."""
    old_logprobs: dict[int, Tensor] = field(default_factory=dict)
    """pi_old of the rollout's updates: the log-probs ``[rows, C]`` of each mini-batch's sampled tokens under the
    policy that sampled them, by mini-batch, taken by the loss's own forward before the policy moved."""

    def positions(self, part: slice) -> Trajectory:
        """The trajectory of the positions in ``part`` only: their prompts, their groups of completions, rewards
        and advantages."""
        if (part.start, part.stop) == (0, len(self.prompts)):
            return self
        group = len(self.rollout.texts) // len(self.prompts)
        rows = slice(part.start * group, part.stop * group)
        # Every field of a Rollout is per completion (a tensor or a list of N) or absent.
        rollout = replace(self.rollout, **{f.name: value[rows] for f in fields(self.rollout)
                                           if (value := getattr(self.rollout, f.name)) is not None})
        return Trajectory(self.prompts[part], rollout, self.rewards[part], self.correct[part], self.length[part],
                          self.advantages[rows], self.drawn_at_step)

    def state_dict(self) -> dict:
        """The trajectory as CPU tensors, lists, numbers and strings (a checkpoint loads it with ``weights_only``
        on any host, and gathering it from every rank moves no accelerator memory)."""
        # Shallow, not asdict: its deep copy would first copy every tensor where it is (on the GPU).
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["rollout"] = {f.name: getattr(self.rollout, f.name) for f in fields(self.rollout)}
        return apply_to_collection(state, Tensor, lambda t: t.detach().cpu())

    @classmethod
    def from_state_dict(cls, state: dict) -> Trajectory:
        """The trajectory ``state_dict`` wrote."""
        return cls(**{**state, "rollout": Rollout(**state["rollout"])})
