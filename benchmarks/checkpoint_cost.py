"""What a checkpoint costs as a share of step time, on the quickstart run (``configs/quickstart.yaml``: SmolLM2-135M,
format warm-up steps then RL steps).

    python benchmarks/checkpoint_cost.py                          # 5 warm-up steps + 5 RL steps, a checkpoint after each
    python benchmarks/checkpoint_cost.py --format_warmup_steps 20 --rl_steps 12   # the quickstart's whole 32 steps

The run is built from the quickstart config through ``build_cli(..., run=False)`` (logger and checkpoints in a
temporary folder, ``--trainer.max_steps`` = warm-up + RL steps) with ``PeriodicCheckpoint(every_n_steps=1,
keep_last=1)`` added, so every step is followed by one checkpoint write (policy + AdamW state, written atomically:
temporary file, fsync, rename). A callback times each training step from ``on_train_batch_start`` to just before
the periodic checkpoint's ``on_train_batch_end`` (the step without the write); ``PeriodicCheckpoint.save_seconds``
gives the writes. The write is split into the state dump (``trainer.save_checkpoint`` before the file IO), the
``torch.save`` into the temporary file, the fsyncs (file and folder) and the rest (rename, clean-up), by timing
those calls while a checkpoint is being written.

Figures: step time (mean / median, warm-up and RL steps separately), checkpoint write time (mean / median), the
checkpoint's size (policy / optimizer state / file), the write throughput (MB = 10^6 bytes), and the ratio
checkpoint time / step time with what it means for ``every_n_steps``: the extra time relative to training without
checkpoints (``save / (n * step)``) and the share of the wall time spent writing (``save / (n * step + save)``).
Deleting the previous periodic file (``keep_last=1``) comes after the write and is reported apart, as are the
writes of the config's ModelCheckpoint (epoch-end ``last.ckpt``), which fall outside the timed steps.
Written to ``results/checkpoint_cost.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from common import add_common_arguments, apply_threads, print_table, quiet_transformers, write_json

ROOT = Path(__file__).resolve().parent.parent
EVERY = (1, 10, 50, 100)


class StepTimer(L.Callback):
    """Wall and CPU time of each training step, up to (not including) the periodic checkpoint's write; placed
    just before the PeriodicCheckpoint in the callback list. ``after_save`` marks the end of the whole batch."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._phase = "warmup" if trainer.global_step < self.warmup_steps else "rl"
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({
            "step": trainer.global_step, "phase": self._phase,
            "wall": time.perf_counter() - self._wall, "cpu": time.process_time() - self._cpu,
        })


class AfterSave(L.Callback):
    """Placed after the PeriodicCheckpoint: the batch's wall time including the write (and the old file's deletion)."""

    def __init__(self, timer: StepTimer):
        self.timer = timer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.steps[-1]["with_save"] = time.perf_counter() - self.timer._wall


class WriteProfile:
    """Times the parts of each checkpoint write: the checkpoint IO's ``save_checkpoint`` (the file), and within it
    ``torch.save`` and ``os.fsync``; the rest of ``trainer.save_checkpoint`` is the state dump."""

    def __init__(self, checkpoint_io):
        self.records: list[dict] = []
        self._active: dict | None = None
        io_save = checkpoint_io.save_checkpoint
        real_save, real_fsync = torch.save, os.fsync

        def save_checkpoint(checkpoint, path, storage_options=None):
            record = {"file": Path(path).name, "torch_save": 0.0, "fsync": 0.0, "fsync_calls": 0}
            self._active = record
            started = time.perf_counter()
            try:
                io_save(checkpoint, path, storage_options)
            finally:
                record["io"] = time.perf_counter() - started
                self._active = None
            record["bytes"] = Path(path).stat().st_size
            self.records.append(record)

        def timed_save(*args, **kwargs):
            if self._active is None:
                return real_save(*args, **kwargs)
            started = time.perf_counter()
            try:
                return real_save(*args, **kwargs)
            finally:
                self._active["torch_save"] += time.perf_counter() - started

        def timed_fsync(fd):
            if self._active is None:
                return real_fsync(fd)
            started = time.perf_counter()
            try:
                return real_fsync(fd)
            finally:
                self._active["fsync"] += time.perf_counter() - started
                self._active["fsync_calls"] += 1

        checkpoint_io.save_checkpoint = save_checkpoint
        self._restore = lambda: (setattr(torch, "save", real_save), setattr(os, "fsync", real_fsync),
                                 delattr(checkpoint_io, "save_checkpoint"))
        torch.save, os.fsync = timed_save, timed_fsync

    def restore(self) -> None:
        self._restore()


def state_bytes(state) -> int:
    """Bytes of the distinct tensor storages in a (nested) state dict (tied weights counted once, as torch.save does)."""
    seen: dict[int, int] = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(state)
    return sum(seen.values())


def filesystem(path: Path) -> dict:
    """The mount holding ``path``: device, type, and free space."""
    path = path.resolve()
    best = ("", "", "")
    try:
        with open("/proc/mounts") as handle:
            for line in handle:
                device, mount, kind = line.split()[:3]
                if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best[1]):
                    best = (device, mount, kind)
    except OSError:
        pass
    usage = os.statvfs(path)
    return {"device": best[0], "mount": best[1], "type": best[2], "free_gb": usage.f_bavail * usage.f_frsize / 1e9}


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "median": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.mean(values), "median": statistics.median(values),
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--format_warmup_steps", type=int, default=5,
                        help="format warm-up steps (the quickstart has 20; fewer keep the run short, the step is the same)")
    parser.add_argument("--rl_steps", type=int, default=5, help="RL steps after the warm-up")
    parser.add_argument("--dir", default=None,
                        help="folder for the logs and checkpoints (default: a temporary folder, removed afterwards); "
                             "the write time depends on its disk")
    add_common_arguments(parser)
    parser.add_argument("--out", default="checkpoint_cost")
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)

    from rmt_lightning.callbacks import PeriodicCheckpoint
    from rmt_lightning.cli import build_cli

    with tempfile.TemporaryDirectory(prefix="checkpoint_cost-", dir=args.dir) as work:
        work = Path(work)
        max_steps = args.format_warmup_steps + args.rl_steps
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both argv and args hold options
        try:
            cli = build_cli([
                "--config", args.config,
                f"--seed_everything={args.seed}",
                f"--trainer.max_steps={max_steps}",
                f"--trainer.logger.init_args.save_dir={work / 'logs'}",
                "--trainer.enable_progress_bar=false",
                f"--model.format_warmup_steps={args.format_warmup_steps}",
            ], run=False)
        finally:
            sys.argv = argv
        trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
        timer = StepTimer(args.format_warmup_steps)
        periodic = PeriodicCheckpoint(every_n_steps=1, keep_last=1)
        trainer.callbacks.extend([timer, periodic, AfterSave(timer)])
        profile = WriteProfile(trainer.strategy.checkpoint_io)
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.fit(module, datamodule=datamodule)
        finally:
            profile.restore()
        fit_s = time.perf_counter() - started
        policy_bytes = state_bytes(module.state_dict())
        optimizer_bytes = state_bytes(trainer.optimizers[0].state_dict())
        disk = filesystem(work)
        folder = str(periodic.folder)
        left = sorted(p.name for p in periodic.folder.iterdir())

    periodic_records = [r for r in profile.records if r["file"].startswith("periodic-")]
    other_records = [r for r in profile.records if not r["file"].startswith("periodic-")]
    if len(periodic_records) != len(periodic.save_seconds):
        raise RuntimeError(f"{len(periodic.save_seconds)} periodic writes but {len(periodic_records)} went through the "
                           "timed checkpoint IO; the split of the write is wrong")
    for record, seconds in zip(periodic_records, periodic.save_seconds):
        record["total"] = seconds
        record["dump"] = seconds - record["io"]
        record["rest"] = record["io"] - record["torch_save"] - record["fsync"]
    for step, record in zip(timer.steps, periodic_records):
        record["step"] = step["step"]
        # What the batch's end took beyond the step and the write: deleting the previous periodic file.
        record["delete_old"] = step["with_save"] - step["wall"] - record["total"]

    phases = {}
    for phase in ("warmup", "rl"):
        steps = [s for s in timer.steps if s["phase"] == phase]
        phases[phase] = {"wall": summary([s["wall"] for s in steps]), "cpu": summary([s["cpu"] for s in steps])}
    save = summary(periodic.save_seconds)
    size = statistics.median(r["bytes"] for r in periodic_records)
    parts = {key: statistics.mean(r[key] for r in periodic_records)
             for key in ("dump", "torch_save", "fsync", "rest", "io", "delete_old")}
    throughput = {
        "write_MB_per_s": size / save["mean"] / 1e6,
        "torch_save_MB_per_s": size / parts["torch_save"] / 1e6,
        "file_MB_per_s": size / parts["io"] / 1e6,
    }
    rows = []
    for phase in ("warmup", "rl"):
        step = phases[phase]["wall"]
        if not step["n"]:
            continue
        ratio = save["mean"] / step["mean"]
        rows.append({
            "phase": phase, "steps": step["n"], "step_mean_s": step["mean"], "step_median_s": step["median"],
            "save_mean_s": save["mean"], "ratio": ratio, "ratio_median": save["median"] / step["median"],
            "every": {n: {"overhead": ratio / n, "share": save["mean"] / (n * step["mean"] + save["mean"])} for n in EVERY},
        })

    name = Path(args.config).name
    print_table(
        f"checkpoint write vs step time ({name}, {args.format_warmup_steps} warm-up + {args.rl_steps} RL steps, "
        f"checkpoint {size / 1e6:.0f} MB, {args.threads} torch threads)",
        ["phase", "steps", "step mean s", "step median s", "save mean s", "save / step",
         *[f"share at every {n}" for n in EVERY]],
        [[r["phase"], r["steps"], r["step_mean_s"], r["step_median_s"], r["save_mean_s"], r["ratio"],
          *[f"{100 * r['every'][n]['share']:.1f}%" for n in EVERY]] for r in rows],
    )
    print_table(
        "checkpoint write, mean seconds per part",
        ["total", "state dump", "torch.save", "fsync", "rename etc.", "then: delete old file", "MB", "MB/s (total)",
         "MB/s (torch.save)"],
        [[save["mean"], parts["dump"], parts["torch_save"], parts["fsync"], parts["rest"], parts["delete_old"], size / 1e6,
          throughput["write_MB_per_s"], throughput["torch_save_MB_per_s"]]],
    )
    print(f"size: policy {policy_bytes / 1e6:.1f} MB + AdamW state {optimizer_bytes / 1e6:.1f} MB; "
          f"file {size / 1e6:.1f} MB; disk {disk['device']} ({disk['type']}) at {disk['mount']}", flush=True)

    write_json(args.out, {
        "args": vars(args), "config": name, "max_steps": max_steps, "fit_s": fit_s, "filesystem": disk,
        "checkpoint_folder": folder, "files_left": left,
        "size": {"file_bytes": size, "policy_bytes": policy_bytes, "optimizer_bytes": optimizer_bytes},
        "step": phases, "save": save, "save_parts_mean_s": parts, "save_share_of_write": {
            key: parts[key] / save["mean"] for key in ("dump", "torch_save", "fsync", "rest")},
        "throughput": throughput, "rows": rows,
        "steps": timer.steps, "writes": periodic_records, "other_writes": other_records,
    })


if __name__ == "__main__":
    main()
