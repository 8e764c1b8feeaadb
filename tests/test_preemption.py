"""Runs that survive a cluster: a checkpoint on preemption signals, periodic checkpoints with retention,
``--ckpt_path last`` finding the newest checkpoint of any kind, and exact resume (same per-step losses and
budgets, bit-identical weights) from every kind of stop; checkpoints that hold code are refused by every command."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rmt_lightning import PeriodicCheckpoint, PreemptionCheckpoint
from rmt_lightning.__main__ import main as package_main
from rmt_lightning.callbacks import Preempted
from rmt_lightning.runtime.errors import InputError
from rmt_lightning.cli import build_cli, find_last_checkpoint
from rmt_lightning.engine.builtin_models import build_builtin_tiny

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BATCHES, EPOCHS = 3, 2
CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


@dataclass
class Run:
    losses: dict[int, float]
    budgets: dict[int, float]
    weights: dict[str, torch.Tensor]
    log_dir: Path


def logged(log_dir, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {}


def fit(config: Path, *args) -> Run:
    cli = build_cli(["fit", "--config", str(config), *args])
    log_dir = Path(cli.trainer.logger.log_dir)
    return Run(logged(log_dir, "train/loss"), logged(log_dir, "train/budget"), cli.model.policy.state_dict(), log_dir)


def fit_until_preempted(config: Path, *args) -> Preempted:
    with pytest.raises(Preempted) as stopped:
        build_cli(["fit", "--config", str(config), *args])
    return stopped.value


# What each kind of run changes in configs/tiny.yaml (2 epochs of 3 steps).
VARIANTS = {
    "budget per epoch": {},
    "budget per step": {"granularity": "step"},
    "validation inside the epoch": {"trainer": {"val_check_interval": 2, "check_val_every_n_epoch": 1}},
    "format warm-up": {"model": {"format_warmup_steps": 2}},
}


def variant_config(folder: Path, variant: str, name: str, model: Path) -> Path:
    """configs/tiny.yaml with the variant's changes; checkpoints at every epoch end, after every step
    (PeriodicCheckpoint, all kept) and ``last.ckpt``."""
    edits = VARIANTS[variant]
    config = yaml.safe_load(TINY.read_text())
    config["trainer"].update(max_epochs=EPOCHS, enable_progress_bar=False, **edits.get("trainer", {}))
    config["trainer"]["logger"]["init_args"].update(save_dir=str(folder / "logs"), name=name)
    budget = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("TokenBudget"))
    budget["init_args"]["granularity"] = edits.get("granularity", "epoch")
    config["trainer"]["callbacks"] = [
        budget,
        {"class_path": CHECKPOINT, "init_args": {"save_last": True, "save_top_k": -1, "filename": "{epoch}-{step}"}},
        {"class_path": "rmt_lightning.PeriodicCheckpoint", "init_args": {"every_n_steps": 1, "keep_last": 100}},
    ]
    config["model"].update(model_name_or_path=str(model), **edits.get("model", {}))
    config["data"].update(batches_per_epoch=BATCHES, cache_dir=str(folder / "cache"))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dropout_model):
    """Per variant: its folder and the uninterrupted run of all 6 steps."""
    runs = {}

    def get(variant: str) -> tuple[Path, Run]:
        if variant not in runs:
            folder = tmp_path_factory.mktemp(variant.replace(" ", "-"))
            run = fit(variant_config(folder, variant, "full", dropout_model))
            assert sorted(run.losses) == list(range(BATCHES * EPOCHS))
            runs[variant] = folder, run
        return runs[variant]

    return get


def assert_same_as_uninterrupted(resumed: Run, full: Run, first_step: int) -> float:
    """The resumed run logged the uninterrupted run's losses and budgets for every step from ``first_step`` and
    ended with bit-identical weights; returns the largest weight difference (0.0)."""
    expected = {s: v for s, v in full.losses.items() if s >= first_step}
    assert resumed.losses == expected, (resumed.losses, full.losses)
    assert resumed.budgets == {s: v for s, v in full.budgets.items() if s >= first_step}
    largest = max(float((resumed.weights[n] - w).abs().max()) for n, w in full.weights.items())
    for name, value in full.weights.items():
        assert torch.equal(resumed.weights[name], value), name
    return largest


def stop_and_resume(stop: str, folder: Path, variant: str, model: Path) -> tuple[Run, int]:
    """Stop a run of ``variant`` the way ``stop`` names and resume it; the resumed run and its first step."""
    config = variant_config(folder, variant, stop.replace(" ", "-"), model)
    periodic = folder / "logs" / "full" / "version_0" / "checkpoints"
    if stop == "periodic checkpoint mid-epoch":
        return fit(config, "--ckpt_path", str(periodic / "periodic-step=00000004.ckpt")), 4
    if stop == "periodic checkpoint at step 2":  # the warm-up boundary; before the in-epoch validation
        return fit(config, "--ckpt_path", str(periodic / "periodic-step=00000002.ckpt")), 2
    if stop == "checkpoint after the in-epoch validation":  # ModelCheckpoint saves when validation ends
        return fit(config, "--ckpt_path", str(periodic / "epoch=0-step=2.ckpt")), 2
    if stop == "epoch-end checkpoint":
        return fit(config, "--ckpt_path", str(periodic / f"epoch=0-step={BATCHES}.ckpt")), BATCHES
    if stop == "max_steps at an epoch's end":
        fit(config, "--trainer.max_steps", str(BATCHES))
        return fit(config, "--ckpt_path", "last", "--trainer.max_steps", str(BATCHES * EPOCHS)), BATCHES
    if stop == "max_steps mid-epoch":
        fit(config, "--trainer.max_steps", "4")
        return fit(config, "--ckpt_path", "last"), 4
    if stop == "SIGTERM":
        stopped = fit_until_preempted(config, "--trainer.callbacks+=stopping.SignalAtStep", "--trainer.callbacks.step=3")
        assert stopped.step == 4 and stopped.path.name == "preempted.ckpt" and stopped.exit_status == 128 + signal.SIGTERM
        return fit(config, "--ckpt_path", "last"), 4
    raise AssertionError(stop)


STOPS = {
    "budget per epoch": ["periodic checkpoint mid-epoch", "epoch-end checkpoint", "max_steps at an epoch's end",
                         "max_steps mid-epoch", "SIGTERM"],
    # max_steps is the step schedule's horizon: a shorter one is another schedule, so it is no stop here.
    "budget per step": ["periodic checkpoint mid-epoch", "epoch-end checkpoint", "SIGTERM"],
    "validation inside the epoch": ["periodic checkpoint at step 2", "checkpoint after the in-epoch validation",
                                    "periodic checkpoint mid-epoch", "SIGTERM"],
    "format warm-up": ["periodic checkpoint at step 2", "SIGTERM"],
}


@pytest.mark.parametrize(("variant", "stop"), [(v, s) for v, stops in STOPS.items() for s in stops])
def test_resume_is_exact_after_every_kind_of_stop(variant, stop, uninterrupted, dropout_model):
    folder, full = uninterrupted(variant)
    resumed, first_step = stop_and_resume(stop, folder, variant, dropout_model)
    assert assert_same_as_uninterrupted(resumed, full, first_step) == 0.0


# ---- preemption ------------------------------------------------------------------------------------------


def command_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_sigterm_mid_epoch_exits_128_plus_signal_with_a_checkpoint_that_resumes_exactly(uninterrupted, dropout_model):
    """The command a scheduler runs: SIGTERM arrives inside step 4 (a second one during the same step is ignored);
    the step finishes, one line names the checkpoint, the exit status is 143, and the same command with
    ``--ckpt_path last`` ends with the uninterrupted run's weights."""
    folder, full = uninterrupted("budget per epoch")
    config = variant_config(folder, "budget per epoch", "subprocess", dropout_model)
    command = [sys.executable, "-m", "rmt_lightning", "fit", "--config", str(config)]
    stopped = subprocess.run([*command, "--trainer.callbacks+=stopping.SignalAtStep", "--trainer.callbacks.step=3",
                              "--trainer.callbacks.times=2"], env=command_env(), capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    checkpoint = folder / "logs" / "subprocess" / "version_0" / "checkpoints" / "preempted.ckpt"
    lines = [line for line in stopped.stderr.splitlines() if "SIGTERM" in line]
    assert lines == [f"SIGTERM received: stopped after step 4; checkpoint written to {checkpoint} (resume with --ckpt_path last)"]
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    resumed = fit(config, "--ckpt_path", "last")
    assert_same_as_uninterrupted(resumed, full, first_step=4)


def test_a_signal_during_the_checkpoint_write_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    """SIGTERM again while the preemption checkpoint is written: ignored, the file is complete; and the
    handlers the process had before are back after the run."""
    from rmt_lightning.runtime.checkpointing import AtomicCheckpointIO

    write = AtomicCheckpointIO.save_checkpoint

    sent = []

    def signalled_write(self, checkpoint, path, storage_options=None):
        if "preempted.ckpt" in Path(path).name:
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(path)
        return write(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", signalled_write)
    before = signal.getsignal(signal.SIGTERM)
    config = variant_config(tmp_path, "budget per epoch", "twice", build_builtin_tiny())
    stopped = fit_until_preempted(config, "--trainer.callbacks+=stopping.SignalAtStep", "--trainer.callbacks.step=1")
    assert len(sent) == 1 and stopped.step == 2 and signal.getsignal(signal.SIGTERM) == before
    assert AtomicCheckpointIO().load_checkpoint(stopped.path)["global_step"] == 2


def test_preemption_signals_are_configurable_and_checked():
    assert PreemptionCheckpoint().signals == ["SIGTERM", "SIGINT", "SIGUSR1"]
    assert PreemptionCheckpoint(["SIGUSR2"]).signals == ["SIGUSR2"]
    with pytest.raises(InputError, match=r"preemption signals \['SIGKILL'\] are not signals a process can catch; valid: \["):
        PreemptionCheckpoint(["SIGKILL"])


def test_only_the_configured_signals_preempt(tmp_path):
    """With ``--preemption.signals [SIGUSR2]``, SIGUSR2 preempts (exit 140 from the CLI)."""
    config = variant_config(tmp_path, "budget per epoch", "usr2", build_builtin_tiny())
    stopped = fit_until_preempted(config, "--preemption.signals", "[SIGUSR2]", "--trainer.callbacks+=stopping.SignalAtStep",
                                  "--trainer.callbacks.step=2", "--trainer.callbacks.signal_name=SIGUSR2")
    assert stopped.signum == signal.SIGUSR2 and stopped.exit_status == 140 and stopped.step == 3


def test_slurm_requeue_runs_scontrol_on_the_requeue_signal_only(tmp_path, monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from rmt_lightning.callbacks.checkpoints import requeue_slurm_job

    calls = []
    monkeypatch.setattr(subprocess, "call", lambda command: calls.append(command) or 0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    class Connector:
        cluster_environment = SLURMEnvironment(auto_requeue=True)

    class Trainer:
        _accelerator_connector = Connector()

    assert requeue_slurm_job(Trainer(), signal.SIGUSR1) and calls == [["scontrol", "requeue", "4242"]]
    assert not requeue_slurm_job(Trainer(), signal.SIGTERM) and len(calls) == 1
    Connector.cluster_environment = SLURMEnvironment(auto_requeue=False)
    assert not requeue_slurm_job(Trainer(), signal.SIGUSR1) and len(calls) == 1


# ---- periodic checkpoints and finding the newest ---------------------------------------------------------


def test_periodic_checkpoints_every_n_steps_keep_the_last_k(tmp_path):
    config = variant_config(tmp_path, "budget per epoch", "periodic", build_builtin_tiny())
    cli = build_cli(["--config", str(config), "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.keep_last=2"], run=False)
    [periodic] = [c for c in cli.trainer.callbacks if isinstance(c, PeriodicCheckpoint)]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    folder = Path(cli.trainer.logger.log_dir) / "checkpoints"
    kept = sorted(p.name for p in folder.glob("periodic-*"))
    assert kept == ["periodic-step=00000004.ckpt", "periodic-step=00000006.ckpt"]
    assert torch.load(folder / kept[0], weights_only=True)["global_step"] == 4
    assert len(periodic.save_seconds) == 3 and all(s > 0 for s in periodic.save_seconds)
    assert not list(folder.glob(".*partial*"))


def test_periodic_checkpoints_by_time(tmp_path, monkeypatch):
    """Every T minutes: with the callback's clock moving 10 minutes per reading and T = 15, a checkpoint every
    second step."""
    import rmt_lightning.callbacks.checkpoints as checkpoints

    import time
    from types import SimpleNamespace

    clock = iter(range(0, 10**6, 600))
    monkeypatch.setattr(checkpoints, "time", SimpleNamespace(monotonic=lambda: next(clock), perf_counter=time.perf_counter))
    periodic = PeriodicCheckpoint(every_minutes=15, keep_last=10, dirpath=str(tmp_path / "periodic"))
    config = variant_config(tmp_path, "budget per epoch", "timed", build_builtin_tiny())
    cli = build_cli(["--config", str(config)], run=False)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, PeriodicCheckpoint)] + [periodic]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [int(p.name[14:22]) for p in sorted((tmp_path / "periodic").iterdir())] == [2, 4, 6]


@pytest.mark.parametrize(("arguments", "message"), [
    ({}, "needs every_n_steps or every_minutes"),
    ({"every_n_steps": 0}, "every_n_steps=0 must be >= 1"),
    ({"every_minutes": -1.0}, "every_minutes=-1.0 must be > 0"),
    ({"every_n_steps": 5, "keep_last": 0}, "keep_last=0 must be >= 1"),
])
def test_periodic_checkpoint_bad_arguments(arguments, message):
    with pytest.raises(InputError, match=message):
        PeriodicCheckpoint(**arguments)


def test_ckpt_path_last_takes_the_newest_checkpoint_of_any_kind_in_any_version(tmp_path):
    config = variant_config(tmp_path, "budget per epoch", "newest", build_builtin_tiny())
    cli = build_cli(["--config", str(config)], run=False)
    root = tmp_path / "logs" / "newest"
    with pytest.warns(UserWarning, match="no checkpoint in .*; training starts from the beginning"):
        assert find_last_checkpoint(cli.trainer) is None
    written = []
    for version, name in enumerate(["last.ckpt", "epoch=3-step=12.ckpt", "periodic-step=00000014.ckpt", "preempted.ckpt"]):
        path = root / f"version_{version}" / "checkpoints" / name
        path.parent.mkdir(parents=True)
        torch.save({"global_step": version}, path)
        os.utime(path, (1000 + version, 1000 + version))
        written.append(path)
    assert find_last_checkpoint(cli.trainer) == str(written[-1])
    # A sharded checkpoint folder cut short (no .metadata or meta.pt yet) is never taken, even when newest.
    cut_short = root / "version_4" / "checkpoints" / "periodic-step=00000020.ckpt"
    cut_short.mkdir(parents=True)
    (cut_short / "__0_0.distcp").write_bytes(b"partial")
    assert find_last_checkpoint(cli.trainer) == str(written[-1])
    (cut_short / ".metadata").write_bytes(b"shards done")
    assert find_last_checkpoint(cli.trainer) == str(written[-1])
    (cut_short / "meta.pt").write_bytes(b"loops done")
    assert find_last_checkpoint(cli.trainer) == str(cut_short)
    # What killed writes left (a file and a sharded folder under their hidden names) is removed, nothing else.
    left = [root / "version_1" / "checkpoints" / ".periodic-step=00000016.ckpt.partial",
            root / "version_2" / "checkpoints" / "..periodic-step=00000018.ckpt.partial.partial-4242",
            root / "version_3" / "checkpoints" / ".last.ckpt.partial-77"]
    for path in left[1:]:
        path.write_bytes(b"cut short")
    left[0].mkdir()
    (left[0] / "__0_0.distcp").write_bytes(b"cut short")
    assert find_last_checkpoint(cli.trainer) == str(cut_short)
    assert not any(path.exists() for path in left) and all(path.exists() for path in written)


# ---- checkpoints that hold code ----------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["fit", "validate", "test", "export"])
def test_a_checkpoint_holding_a_pickled_call_is_one_line_and_status_2(command, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1e-3}, "payload": RunsCode(marker)}, checkpoint)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(checkpoint, weights_only=True)  # torch itself refuses it
    if command == "export":
        args = ["export", str(checkpoint), str(tmp_path / "export")]
    else:
        args = [command, "--config", str(TINY), "--data.cache_dir", str(tmp_path / "cache"), "--ckpt_path", str(checkpoint)]
    with pytest.raises(SystemExit) as exit:
        package_main(args)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: checkpoint '{checkpoint}' holds posix.system (code or objects, not only tensors and plain "
                     "values); it is not loaded, since unpickling it could run code"]
    assert "weights_only=False" not in error[0] and not marker.exists()


def progress(ready, started, processed, completed) -> dict:
    return {"ready": ready, "started": started, "processed": processed, "completed": completed}


def loops(epoch: dict, batch: dict, is_last_batch: bool = False) -> dict:
    return {"loops": {"fit_loop": {
        "epoch_progress": {"total": dict(epoch), "current": dict(epoch)},
        "epoch_loop.batch_progress": {"total": dict(batch), "current": dict(batch), "is_last_batch": is_last_batch},
        "epoch_loop.state_dict": {"_batches_that_stepped": 4},
    }}, "epoch": 0}


def test_loop_counters_are_rewritten_into_the_batch_end_form():
    from rmt_lightning.runtime.checkpointing import as_batch_end_checkpoint

    # Written when an epoch ended (epoch processed, not completed; its last batch completed).
    checkpoint = loops(progress(1, 1, 1, 0), progress(3, 3, 3, 3), is_last_batch=True)
    as_batch_end_checkpoint(checkpoint)
    loop = checkpoint["loops"]["fit_loop"]
    assert loop["epoch_progress"]["current"] == progress(1, 1, 0, 0)
    assert loop["epoch_loop.batch_progress"]["current"] == progress(3, 3, 3, 2)
    assert loop["epoch_loop.state_dict"]["_batches_that_stepped"] == 3
    # Already in that form: unchanged (the rewrite runs when a checkpoint is written and again when read).
    again = loops(progress(1, 1, 0, 0), progress(3, 3, 3, 2), is_last_batch=True)
    as_batch_end_checkpoint(again)
    assert again == loops(progress(1, 1, 0, 0), progress(3, 3, 3, 2), is_last_batch=True)
    # An epoch in progress that Lightning never counted as started (a run resumed at an epoch's last batch,
    # before count_the_next_epoch_after_resume): counted, so it resumes as the mid-epoch checkpoint it is.
    uncounted = loops(progress(1, 1, 1, 1), progress(1, 1, 1, 0))
    as_batch_end_checkpoint(uncounted)
    assert uncounted["loops"]["fit_loop"]["epoch_progress"]["current"] == progress(2, 2, 1, 1)
    assert uncounted["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"] == progress(1, 1, 1, 0)
