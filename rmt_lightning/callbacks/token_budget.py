"""TokenBudget: sets the module's reasoning budget from training progress, the same on every rank."""

from __future__ import annotations

import math

import lightning as L

from ..method import token_budget
from ..runtime.errors import InputError, in_open_interval

GRANULARITIES = ("epoch", "step")


class TokenBudget(L.Callback):
    """Decays the reasoning budget ``B_t = max(b_min, floor(b0 * gamma ** ((t / T) ** k)))``.

    Progress comes from the trainer's counters, which every rank shares, so every rank computes the same
    budget without communicating. The budget is written to ``pl_module.budget`` at each epoch start
    (``granularity="epoch"``, progress = epoch / max_epochs) or each step start (``"step"``,
    progress = global_step / estimated_stepping_batches), and the budget at progress 1 to
    ``pl_module.final_budget`` when any stage starts (what ``validate`` and ``test`` evaluate a finished model with).

    Args:
        b0: Initial budget B_0 in tokens (paper: 800).
        b_min: Floor B_min (paper: 1).
        gamma: Decay factor in (0, 1): the budget reaches ``b0 * gamma`` at the end (paper: 0.2).
        k: Exponent on progress (1: the paper's schedule).
        granularity: ``epoch`` (default) or ``step``.
    """

    def __init__(self, b0: int = 800, b_min: int = 1, gamma: float = 0.2, k: float = 1.0, granularity: str = "epoch"):
        if granularity not in GRANULARITIES:
            raise InputError(f"granularity '{granularity}' is not valid; valid: {list(GRANULARITIES)}")
        if not 1 <= b_min <= b0:
            raise InputError(f"budget b_min={b_min}, b0={b0} is not valid: it needs 1 <= b_min <= b0")
        in_open_interval("gamma", gamma, 0.0, 1.0)
        in_open_interval("k", k, 0.0, math.inf)
        self.b0, self.b_min, self.gamma, self.k, self.granularity = b0, b_min, gamma, k, granularity
        self.budget = b0
        self.progress = 0.0

    @staticmethod
    def _total_epochs(trainer: L.Trainer) -> int:
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            return trainer.max_epochs
        return max(1, math.ceil(trainer.estimated_stepping_batches / max(1, trainer.num_training_batches)))

    def progress_of(self, trainer: L.Trainer) -> float:
        """Training progress t / T in [0, 1] at the trainer's current epoch or step."""
        if self.granularity == "epoch":
            progress = trainer.current_epoch / self._total_epochs(trainer)
        else:
            progress = trainer.global_step / max(1, trainer.estimated_stepping_batches)
        return min(1.0, max(0.0, progress))

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress = self.progress_of(trainer)
        self.budget = token_budget(self.progress, self.b0, self.b_min, self.gamma, self.k)
        pl_module.budget = self.budget

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.final_budget = self.final_budget

    def on_train_start(self, trainer, pl_module) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: set its budget here.
        self._apply(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.granularity == "epoch":
            self._apply(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.granularity == "step":
            self._apply(trainer, pl_module)

    @staticmethod
    def of(trainer: L.Trainer | None) -> "TokenBudget | None":
        """The run's budget schedule: the trainer's TokenBudget callback, or None (a fixed budget). The one place
        that looks for it."""
        found = [c for c in trainer.callbacks if isinstance(c, TokenBudget)] if trainer is not None else []
        if len(found) > 1:
            raise ValueError(f"{len(found)} TokenBudget callbacks: a run has one budget schedule")
        return found[0] if found else None

    @property
    def final_budget(self) -> int:
        """The budget at progress 1, where training ends: what a finished model is evaluated with outside
        ``fit`` (``RMTModule.final_budget``)."""
        return token_budget(1.0, self.b0, self.b_min, self.gamma, self.k)

    def state_dict(self) -> dict:
        return {"budget": self.budget, "progress": self.progress}

    def load_state_dict(self, state_dict: dict) -> None:
        self.budget = state_dict["budget"]
        self.progress = state_dict["progress"]
