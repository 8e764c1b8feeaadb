"""Checkpoints that survive faults and resume exactly.

- ``AtomicCheckpointIO`` writes each checkpoint to a temporary file in the target folder, flushes it to disk
  and renames it over the target, so a process killed mid-write leaves the previous file intact. It loads
  with ``weights_only=True`` after checking every record's CRC, so a truncated or corrupted file is an error
  naming the file, never silently wrong weights.
- ``rng_states`` / ``restore_rng_states``: the global random generators, saved in every checkpoint.
- ``as_batch_end_checkpoint``: loop counters in the form Lightning resumes exactly, whether the checkpoint was
  written mid-epoch, at an epoch's end or after ``max_steps`` stopped the run, and whether or not the resumed
  run sets ``max_steps``.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .atomic import fsync_folder, staged_file
from .errors import InputError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint files written atomically (temporary file in the same folder, fsync, rename) and verified when
    loaded. Lightning's default writes through a temporary file in the system's temp folder, which is a copy,
    not a rename, when that folder is on another disk; a kill during the copy leaves a truncated checkpoint.

    ``RMTCLI`` installs it as the default; with the Python API pass ``plugins=[AtomicCheckpointIO()]``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        # The staging file is hidden and not named like a checkpoint, so nothing takes it for "last".
        with staged_file(path) as partial, open(partial, "wb") as handle:
            torch.save(checkpoint, handle)
        # Partial files of earlier writes to this path were killed mid-way (only one process writes a path).
        for stale in path.parent.glob(f".{path.name}.partial-*"):
            stale.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if "://" not in str(path):
            verify_checkpoint_file(path, full=True)
        # To the CPU first, as Lightning's own loader does, whatever device saved it: a GPU checkpoint then loads on
        # a host without one, and every process of a resumed run does not put rank 0's tensors on rank 0's GPU.
        # The strategy then moves the weights and optimizer states to where it trains.
        map_location = "cpu" if map_location is None else map_location
        try:
            # Checkpoints hold only tensors and plain values: nothing in one may run code when it is loaded.
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise unsafe_checkpoint_error(path, error) from None
        except FileNotFoundError:
            raise
        except Exception as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise InputError(f"checkpoint '{path}' cannot be loaded: {type(error).__name__}: {first_line}") from None


def unsafe_checkpoint_error(path, error: pickle.UnpicklingError) -> InputError:
    """The one-line error for a checkpoint that ``weights_only=True`` refuses: it names the file and what it
    holds, and gives no advice to load it another way."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return InputError(
        f"checkpoint '{path}' holds {found.group(1) if found else 'an object'} (code or objects, not only tensors "
        "and plain values); it is not loaded, since unpickling it could run code"
    )


def save_checkpoint_atomically(trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to ``path`` such that a kill at any moment leaves either the previous checkpoint
    at ``path`` or the new one, never a mix: the checkpoint is written under a hidden name beside ``path`` and
    renamed into place once every rank has written its part. A single file is atomic already
    (``AtomicCheckpointIO``); a sharded checkpoint is a folder that the strategy fills shard by shard, which a
    kill would leave half-new. Every rank must call it."""
    path = Path(path)
    partial, previous = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.previous")
    if trainer.is_global_zero:
        for stale in (partial, previous):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
    trainer.strategy.barrier("save_checkpoint_atomically")
    trainer.save_checkpoint(partial, weights_only=False)
    if trainer.is_global_zero:
        if partial.is_dir() and path.exists():
            # A folder cannot be renamed over another: move the old one aside first, delete it last.
            os.replace(path, previous)
        os.replace(partial, path)
        fsync_folder(path.parent)
        shutil.rmtree(previous) if previous.is_dir() else previous.unlink(missing_ok=True)
    trainer.strategy.barrier("save_checkpoint_atomically")


_PARTIAL_WRITE = re.compile(r"^\..+\.ckpt\.(partial(-\d+)?|previous)(\.partial-\d+)?$")


def remove_partial_writes(folders) -> list[Path]:
    """Delete what killed checkpoint writes left in ``folders`` (the hidden ``.<name>.partial...`` files and
    folders ``AtomicCheckpointIO`` and ``save_checkpoint_atomically`` write before renaming); returns them.
    Call it before training starts, on one process: a run writes only into its own version's folder, so in the
    folders of earlier versions nothing else is writing."""
    removed = []
    for folder in folders:
        if not Path(folder).is_dir():
            continue
        for path in Path(folder).iterdir():
            if _PARTIAL_WRITE.match(path.name):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def use_atomic_checkpoint_io(strategy) -> None:
    """Make ``strategy`` write checkpoints with ``AtomicCheckpointIO`` when it uses Lightning's plain one;
    strategies with their own checkpoint IO (sharded checkpoints) keep it."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def verify_checkpoint_file(path, full: bool = False) -> None:
    """``path`` is a readable checkpoint file: it exists and its zip directory reads (a truncated file fails
    here); with ``full``, every record also matches its CRC (reads the whole file once). A folder (a sharded
    checkpoint) is left to its strategy."""
    path = Path(path)
    if path.is_dir():
        return
    if not path.exists():
        raise InputError(f"checkpoint '{path}' does not exist; give an existing .ckpt file or 'last'")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip() if full else None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InputError(
            f"checkpoint '{path}' is truncated or not a PyTorch checkpoint ({error}); resume from an earlier checkpoint"
        ) from None
    if damaged is not None:
        raise InputError(f"checkpoint '{path}' is corrupted (record '{damaged}' fails its CRC check); resume from an earlier checkpoint")


def rng_states() -> dict[str, Any]:
    """The global random generators of this process (torch, CUDA, numpy, Python), as plain values and tensors."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random generators to ``states`` from ``rng_states``."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def as_batch_end_checkpoint(checkpoint: dict[str, Any], batches_per_epoch: int | float = math.inf) -> None:
    """Write ``checkpoint``'s loop counters in the one form Lightning resumes exactly in every mode.

    Lightning marks an epoch processed when its loop ends, whether its batches ran out or ``max_steps``
    stopped it, and a checkpoint written then resumes wrongly in two ways:

    - cut short by ``max_steps`` (the ``last.ckpt`` of a run that ends mid-epoch), it resumes at the *next*
      epoch and silently skips the rest of this one;
    - written at an epoch's end (``max_steps`` landing on it, or an epoch-end checkpoint), it resumes right
      only when the resumed run is epoch-based: with ``max_steps`` set, Lightning runs the finished epoch's
      end again, so the next epoch trains under the wrong epoch number (the previous epoch's token budget,
      the next epoch's curriculum draws) and its steps are logged one step late.

    Both are rewritten as what a checkpoint written after the epoch's last trained batch holds (epoch not
    yet processed, the last batch processed but not completed), which resumes at the batch the sampler's
    state points to, in epoch- and step-based runs alike.
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop:
        return
    epochs = loop["epoch_progress"]
    batches = loop["epoch_loop.batch_progress"]
    if batches["current"]["processed"] > 0 and all(
        len({counts["ready"], counts["started"], counts["processed"], counts["completed"]}) == 1
        for counts in (epochs["total"], epochs["current"])
    ):
        # An epoch in progress that Lightning never counted as started (see count_the_next_epoch_after_resume;
        # written before that repair existed): count it, and it resumes as the mid-epoch checkpoint it is.
        for counts in (epochs["total"], epochs["current"]):
            counts["ready"] = counts["started"] = counts["processed"] + 1
        return
    batches_done = batches["current"]["completed"]
    if epochs["current"]["processed"] != epochs["current"]["started"] or batches_done == 0:
        return
    for counts in (epochs["total"], epochs["current"]):
        counts["processed"] = counts["started"] - 1
        counts["completed"] = counts["processed"]
    checkpoint["epoch"] = epochs["current"]["completed"]
    if batches.get("is_last_batch") or batches_done >= batches_per_epoch:
        for counts in (batches["total"], batches["current"]):
            counts["completed"] = counts["processed"] - 1
        loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1


def count_the_next_epoch_after_resume(trainer) -> None:
    """Repair Lightning's epoch counters of a run resumed from a checkpoint written after an epoch's last batch.

    Lightning counts that epoch processed and completed when it restores such a checkpoint, but the restart
    flag it leaves set (``restarted_mid_epoch``) then keeps the *next* epoch from being counted as ready and
    started, and from calling ``on_train_epoch_start``. Training itself is right, but every checkpoint written
    in that next epoch says "no epoch in progress", and resuming from one logs every step one step early or
    trains an extra epoch. Clearing the flag once the restore is done lets the next epoch start as any epoch
    does. Call it in ``on_train_start`` (after the restore, before the first epoch starts)."""
    fit_loop = trainer.fit_loop
    if fit_loop.restarted_mid_epoch and fit_loop.epoch_loop.batch_progress.is_last_batch and (
        fit_loop.epoch_progress.current.processed == fit_loop.epoch_progress.current.started
    ):
        fit_loop.reset_restart_stage()
