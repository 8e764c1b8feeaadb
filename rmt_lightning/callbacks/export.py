"""Write the trained policy as a Hugging Face folder that ``from_pretrained`` loads."""

from __future__ import annotations

import os
import pickle

import lightning as L

from ..runtime.checkpointing import unsafe_checkpoint_error, verify_checkpoint_file
from ..runtime.distributed import full_state_dict
from ..runtime.errors import InputError


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


def export_checkpoint(ckpt_path: str, dirpath: str) -> str:
    """Save the policy of a full (single-file) Lightning checkpoint as a Hugging Face folder, in one process.

    Works for checkpoints written by one process, by DDP, by FSDP1 with its default ``state_dict_type="full"``
    and by FSDP2 with ``save_distributed_checkpoint=False`` (the strategy gathers the full weights into one file).
    """
    from ..module import RMTModule

    if os.path.isdir(ckpt_path):
        raise InputError(
            f"checkpoint '{ckpt_path}' is a sharded (distributed) checkpoint folder; export needs a full checkpoint "
            "file: write one with --trainer.strategy.init_args.save_distributed_checkpoint false (FSDP2) or "
            "--trainer.strategy.init_args.state_dict_type full (FSDP1)"
        )
    verify_checkpoint_file(ckpt_path, full=True)
    try:
        module = RMTModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise unsafe_checkpoint_error(ckpt_path, error) from None
    module.policy.save_pretrained(dirpath)
    module.tokenizer.save_pretrained(dirpath)
    return dirpath
