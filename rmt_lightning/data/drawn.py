"""What the datamodules of both tasks share: training batches drawn by a ``CurriculumBatchSampler`` (seeded per
step, every rank its share of the global batch, draws repeated for the steps of one rollout), and the sampler's
place in a checkpoint, so a run resumes on the batch after the last one trained on."""

from __future__ import annotations

import warnings

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from .sampler import CurriculumBatchSampler, DrawRepeats


class DrawnDataModule(L.LightningDataModule):
    """A datamodule whose training batches come from ``self.sampler`` (a ``CurriculumBatchSampler`` made in
    ``setup``), with ``hparams.seed`` and ``hparams.batches_per_epoch``."""

    def __init__(self):
        super().__init__()
        self.sampler: CurriculumBatchSampler | None = None
        self.draw_repeats = DrawRepeats()
        """Which training steps share one draw (default: each its own). ``GRPOModule.setup`` sets it from the
        module's own arguments (the steps a rollout feeds), so the two cannot disagree."""
        self._pending_sampler_state: dict | None = None
        self._consumed: dict | None = None

    def _load_pending_sampler_state(self) -> None:
        """After ``setup`` made the sampler: the state a checkpoint restored before it existed."""
        if self._pending_sampler_state is not None:
            self.sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None

    def _rank_and_world_size(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _loader_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed)

    def _total_batches(self) -> int:
        per_epoch = self.hparams.batches_per_epoch
        limits = []
        if self.trainer is not None:
            if self.trainer.max_steps is not None and self.trainer.max_steps > 0:
                limits.append(self.trainer.max_steps)
            if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
                limits.append(self.trainer.max_epochs * per_epoch)
        return max(1, min(limits)) if limits else per_epoch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # The sampler runs one batch ahead of training; the resume point is the last batch trained on.
        if getattr(batch, "curriculum_batch", None) is not None:
            self._consumed = {"epoch": batch.curriculum_epoch, "batches_yielded": batch.curriculum_batch + 1}
        return batch

    def state_dict(self) -> dict:
        if self.sampler is None:
            return {}
        state = self.sampler.state_dict()
        if self._consumed is not None:
            state.update(self._consumed)
        return {"sampler": state}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("sampler")
        if state is None:
            return
        if self.trainer is not None and self.trainer.state.fn != TrainerFn.FITTING:
            # Where training stood matters to training only; validate and test take any global batch size.
            return
        # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader itself is stateful; here
        # the sampler resumes from this state instead, exactly.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        if self.sampler is None:
            self._pending_sampler_state = state
        else:
            self.sampler.load_state_dict(state)
