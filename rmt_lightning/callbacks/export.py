"""Write the trained policy as a Hugging Face folder that ``from_pretrained`` loads."""

from __future__ import annotations

import os

import lightning as L

from ..distributed import full_state_dict


class HuggingFaceExport(L.Callback):
    """At the end of ``fit``, saves the policy and tokenizer with ``save_pretrained``.

    Args:
        dirpath: Output folder (None: ``<log_dir>/hf_export``).
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def export_dir(self, trainer: L.Trainer) -> str:
        """Folder the export goes to."""
        return self.dirpath or os.path.join(trainer.log_dir or ".", "hf_export")

    def on_train_end(self, trainer, pl_module) -> None:
        # Both calls are collectives (log_dir broadcasts, a sharded policy gathers): every rank makes them.
        folder = self.export_dir(trainer)
        state = full_state_dict(pl_module.policy)
        if trainer.is_global_zero:
            pl_module.policy.save_pretrained(folder, state_dict=state)
            pl_module.tokenizer.save_pretrained(folder)
