"""A callback that sends this process a signal at the start of a given training step, as a scheduler would
(the tests start runs with it from the command line: ``--trainer.callbacks+=stopping.SignalAtStep``)."""

import os
import signal

import lightning as L


class SignalAtStep(L.Callback):
    """Send ``signal_name`` to this process when optimizer step ``step`` starts (on ``rank`` only, or on every
    rank when None), so the signal arrives in the middle of that step."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", rank: int | None = None, times: int = 1):
        self.step, self.signal_name, self.rank, self.times = step, signal_name, rank, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            for _ in range(self.times):
                os.kill(os.getpid(), signal.Signals[self.signal_name])
