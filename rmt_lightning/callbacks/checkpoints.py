"""Checkpoints for long runs on shared clusters: one written when the scheduler asks the run to stop, and one every
N steps or T minutes. Both go to the run's checkpoint folder, where ``--ckpt_path last`` finds the newest."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..runtime.checkpointing import save_checkpoint_atomically, use_atomic_checkpoint_io
from ..runtime.errors import InputError

PREEMPTION_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
PREEMPTED_NAME = "preempted.ckpt"
PERIODIC_NAME = re.compile(r"^periodic-step=(\d+)\.ckpt$")


def checkpoint_folder(trainer: L.Trainer, dirpath: str | None = None) -> Path:
    """Where the run's checkpoints go: ``dirpath``, else the first ModelCheckpoint's folder, else
    ``<log_dir>/checkpoints`` (as ModelCheckpoint would choose). Every rank must call it (``log_dir`` is a
    collective under DDP)."""
    if dirpath:
        return Path(dirpath)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    log_dir = trainer.log_dir if trainer.loggers else None
    return Path(log_dir or trainer.default_root_dir) / "checkpoints"


class Preempted(Exception):
    """The run stopped on a preemption signal after writing a checkpoint; ``exit_status`` is what a shell
    reports for a process that signal ended (128 + its number), so a scheduler counts the run as stopped, not
    finished."""

    def __init__(self, signum: int, path: Path, step: int, global_rank: int):
        self.signum, self.path, self.step, self.global_rank = signum, path, step, global_rank
        self.exit_status = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: stopped after step {step}; checkpoint written to {path} "
            "(resume with --ckpt_path last)"
        )


class PreemptionCheckpoint(L.Callback):
    """On a preemption signal, finish the current training step, write a checkpoint and stop.

    Schedulers preempt with a signal and kill after a grace period (SLURM: SIGTERM, or the signal of
    ``--signal``; Kubernetes and spot VMs: SIGTERM). The signal only marks the run; at the end of the step the
    ranks agree (the largest signal number any rank received, so all stop at the same step whether one rank
    or all got it), write ``preempted.ckpt`` in the run's checkpoint folder (atomically: a second signal is
    ignored meanwhile, and a kill leaves the previous file whole) and raise ``Preempted``; the CLI prints one
    line naming the file and exits with 128 + the signal's number. Under SLURM with Lightning's
    auto-requeue (its default), the requeue signal (SIGUSR1) also requeues the job once the checkpoint is
    written. A signal while entropy is scored stops the scoring after the shards in flight, keeping the finished
    ones (``data.scoring_pass``); one at another moment before training starts ends the process as usual.

    The CLI always adds one (``--preemption.signals``); with the Python API add it to the Trainer's callbacks.

    Args:
        signals: Signal names that preempt (``[]``: none, the signals keep their usual effect).
        dirpath: Folder of the checkpoint (None: the run's checkpoint folder, where ``--ckpt_path last`` looks).
    """

    def __init__(self, signals: list[str] = list(PREEMPTION_SIGNALS), dirpath: str | None = None):
        valid = sorted(s.name for s in signal.valid_signals() if isinstance(s, signal.Signals)
                       and s not in (signal.SIGKILL, signal.SIGSTOP))
        unknown = [name for name in signals if name not in valid]
        if unknown:
            raise InputError(f"preemption signals {unknown} are not signals a process can catch; valid: {valid}")
        self.signals = list(signals)
        self.dirpath = dirpath
        self.received: int | None = None
        """The first preemption signal this process received during training (None: none)."""
        self._previous: dict[int, object] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        use_atomic_checkpoint_io(trainer.strategy)

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's own handlers (registered just before training), which these replace for the run.
        self.received = None
        self.folder = checkpoint_folder(trainer, self.dirpath)
        if threading.current_thread() is threading.main_thread():
            for name in self.signals:
                number = signal.Signals[name]
                self._previous[number] = signal.signal(number, self._mark)

    def _mark(self, signum: int, frame) -> None:
        # Nothing else is safe here (the step may be inside a collective): the step's end reads the mark.
        if self.received is None:
            self.received = signum

    def _agreed_signal(self, trainer) -> int:
        if trainer.world_size == 1:
            return self.received or 0
        mark = torch.tensor(float(self.received or 0), device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(mark, reduce_op="max"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        path = self.folder / PREEMPTED_NAME
        save_checkpoint_atomically(trainer, path)
        if trainer.is_global_zero:
            requeue_slurm_job(trainer, signum)
        raise Preempted(signum, path, trainer.global_step, trainer.global_rank)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number, handler in self._previous.items():
                signal.signal(number, handler)
        self._previous = {}

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore_handlers()


def requeue_slurm_job(trainer: L.Trainer, signum: int) -> bool:
    """Under SLURM with Lightning's auto-requeue on, requeue the job when ``signum`` is its requeue signal (what
    Lightning does on that signal, after the checkpoint instead of before). Returns whether it asked SLURM."""
    environment = trainer._accelerator_connector.cluster_environment
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue and signum == environment.requeue_signal):
        return False
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    status = subprocess.call(["scontrol", "requeue", job])
    if status == 0:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"scontrol requeue {job} failed with status {status}; the job is not requeued")
    return True


class PeriodicCheckpoint(L.Callback):
    """Write a checkpoint every ``every_n_steps`` optimizer steps and/or every ``every_minutes`` minutes, keeping the
    newest ``keep_last`` (``periodic-step=<step>.ckpt`` in the run's checkpoint folder, written atomically).

    A run killed without warning loses at most the steps since the newest one; ``--ckpt_path last`` resumes from
    it. The minutes are counted on rank 0, which tells the others, so every rank writes at the same step.
    ``save_seconds`` holds how long each write took.

    Args:
        every_n_steps: Optimizer steps between two checkpoints (None: by time only).
        every_minutes: Minutes between two checkpoints (None: by steps only).
        keep_last: Periodic checkpoints kept; older ones are deleted once a newer one is written.
        dirpath: Folder of the checkpoints (None: the run's checkpoint folder, where ``--ckpt_path last`` looks).
    """

    def __init__(self, every_n_steps: int | None = None, every_minutes: float | None = None, keep_last: int = 2,
                 dirpath: str | None = None):
        if every_n_steps is None and every_minutes is None:
            raise InputError("PeriodicCheckpoint needs every_n_steps or every_minutes (or both)")
        if every_n_steps is not None and every_n_steps < 1:
            raise InputError(f"every_n_steps={every_n_steps} must be >= 1 (or None: by time only)")
        if every_minutes is not None and not every_minutes > 0:
            raise InputError(f"every_minutes={every_minutes} must be > 0 (or None: by steps only)")
        if keep_last < 1:
            raise InputError(f"keep_last={keep_last} must be >= 1")
        self.every_n_steps, self.every_minutes, self.keep_last, self.dirpath = every_n_steps, every_minutes, keep_last, dirpath
        self.save_seconds: list[float] = []
        self._last_saved_step: int | None = None
        self._last_saved_time = time.monotonic()

    def setup(self, trainer, pl_module, stage: str) -> None:
        use_atomic_checkpoint_io(trainer.strategy)

    def on_train_start(self, trainer, pl_module) -> None:
        self.folder = checkpoint_folder(trainer, self.dirpath)
        self._last_saved_time = time.monotonic()

    def _due(self, trainer) -> bool:
        step = trainer.global_step
        if step == self._last_saved_step:  # a skipped (non-finite) step did not move the weights
            return False
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.every_minutes is None:
            return False
        elapsed = time.monotonic() - self._last_saved_time >= 60 * self.every_minutes
        return bool(trainer.strategy.broadcast(elapsed, src=0)) if trainer.world_size > 1 else elapsed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._due(trainer):
            return
        started = time.perf_counter()
        save_checkpoint_atomically(trainer, self.folder / f"periodic-step={trainer.global_step:08d}.ckpt")
        self.save_seconds.append(time.perf_counter() - started)
        self._last_saved_step, self._last_saved_time = trainer.global_step, time.monotonic()
        if trainer.is_global_zero:
            self._delete_old()

    def _delete_old(self) -> None:
        found = sorted((int(m.group(1)), path) for path in self.folder.iterdir() if (m := PERIODIC_NAME.match(path.name)))
        for _, path in found[: -self.keep_last]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
