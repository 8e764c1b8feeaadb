"""Preemption and resume across processes, with two real CPU processes (gloo): SIGTERM to one DDP rank stops both
at the same step with one checkpoint, which resumes to the uninterrupted run's weights; a DDP checkpoint resumes
in one process and a one-process checkpoint under DDP, with the same budget, the same global batches and the
same optimizer state; a global batch that differs from the checkpoint's is one clear error; with two updates per
rollout (DDP and FSDP2), a preemption inside a rollout resumes exactly."""

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist

from distributed_probe import assert_trained, run_probe
from rmt_lightning.cli import build_cli
from test_reliability import run_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
EPOCHS = 3  # of 2 steps each (configs/tiny.yaml)
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def common(workdir: Path, name: str) -> list[str]:
    return ["--config", TINY, "--trainer.max_epochs", str(EPOCHS), "--trainer.enable_progress_bar", "false",
            "--trainer.limit_val_batches", "0", "--data.cache_dir", str(workdir / "cache"),
            "--trainer.logger.init_args.save_dir", str(workdir / "logs"), "--trainer.logger.init_args.name", name]


def fit_command(workdir: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rmt_lightning", "fit", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)


def final_weights(workdir: Path, name: str, version: int) -> dict[str, torch.Tensor]:
    path = workdir / "logs" / name / f"version_{version}" / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """An uninterrupted 2-process DDP run (with the probe), and the same run with SIGTERM sent to rank 1 alone in
    the middle of step 3."""
    workdir = tmp_path_factory.mktemp("ddp-preemption")
    full = run_probe(workdir, workdir / "full-probe", [*common(workdir, "full"), *DDP])
    stopped = fit_command(workdir, [*common(workdir, "stopped"), *DDP, "--trainer.callbacks+=stopping.SignalAtStep",
                                    "--trainer.callbacks.step=3", "--trainer.callbacks.rank=1"])
    return workdir, full, stopped


def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_step_with_one_checkpoint(ddp_runs):
    workdir, _, stopped = ddp_runs
    checkpoint = workdir / "logs" / "stopped" / "version_0" / "checkpoints" / "preempted.ckpt"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    assert [line for line in stopped.stderr.splitlines() if "received" in line] == [
        f"SIGTERM received: stopped after step 4; checkpoint written to {checkpoint} (resume with --ckpt_path last)"
    ]
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 4 and saved["RMTDataModule"]["sampler"]["global_batch_size"] == 4


def test_ddp_preemption_checkpoint_resumes_to_the_uninterrupted_weights(ddp_runs):
    workdir, _, _ = ddp_runs
    resumed = fit_command(workdir, [*common(workdir, "stopped"), *DDP, "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming from" in resumed.stderr and "preempted.ckpt" in resumed.stderr
    full, after = final_weights(workdir, "full", 0), final_weights(workdir, "stopped", 1)
    for name, value in full.items():
        assert torch.equal(after[name], value), name


class OptimizerAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())  # the live tensors move on


def test_ddp_checkpoint_resumes_in_one_process_with_the_same_schedule_draws_and_optimizer(ddp_runs):
    """Per-rank sampling streams cannot carry over (each rank seeds its own), so losses differ; what carries over
    is the budget, the global batch of every step and the optimizer state."""
    workdir, full, _ = ddp_runs
    checkpoint = workdir / "logs" / "stopped" / "version_0" / "checkpoints" / "preempted.ckpt"
    cli = build_cli([*common(workdir, "one"), "--data.batch_size", "4"], run=False)
    probe = OptimizerAtStart()
    cli.trainer.callbacks.append(probe)
    draws, budgets = {}, {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            draws[trainer.global_step] = sorted(zip(batch.position_documents.tolist(), batch.positions.tolist()))
            budgets[trainer.global_step] = pl_module.budget

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(checkpoint))
    assert sorted(draws) == [4, 5]
    for step in draws:
        ranks = [record["steps"][step] for record in full]
        assert budgets[step] == ranks[0]["budget"] == ranks[1]["budget"]
        assert draws[step] == sorted(tuple(d) for r in ranks for d in r["draws"])
    saved = torch.load(checkpoint, weights_only=True)["optimizer_states"][0]
    assert saved["state"].keys() == probe.state["state"].keys() and len(saved["state"]) > 10
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(probe.state["state"][key][name], value), (key, name)


def test_one_process_checkpoint_resumes_under_ddp_with_the_same_schedule_and_draws(ddp_runs, tmp_path):
    workdir, full, _ = ddp_runs
    args = [*common(workdir, "single"), "--data.batch_size", "4"]
    assert run_main(["fit", *args, "--trainer.max_steps", "3", "--trainer.max_epochs", str(EPOCHS)]) == 0
    checkpoint = workdir / "logs" / "single" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = run_probe(workdir, tmp_path / "probe", [*common(workdir, "single"), *DDP], ckpt=str(checkpoint))
    assert [s["global_step"] for s in resumed[0]["steps"]] == [3, 4, 5]
    for index, step in enumerate(range(3, 6)):
        expected = full[0]["steps"][step], full[1]["steps"][step]
        got = resumed[0]["steps"][index], resumed[1]["steps"][index]
        assert [g["budget"] for g in got] == [e["budget"] for e in expected]
        assert sorted(d for g in got for d in g["draws"]) == sorted(d for e in expected for d in e["draws"])


def test_resume_with_another_global_batch_is_one_error_line(ddp_runs, capsys):
    workdir, _, _ = ddp_runs
    checkpoint = workdir / "logs" / "stopped" / "version_0" / "checkpoints" / "preempted.ckpt"
    assert run_main(["fit", *common(workdir, "mismatch"), "--ckpt_path", str(checkpoint)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the checkpoint drew global batches of 4 positions; this run draws 2 (batch_size 2 x 1 process(es)): "
        "set data.batch_size 4 to continue the same curriculum"
    )


FSDP2 = ["--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy"]


def test_fsdp2_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path):
    """torch's distributed checkpoint reshards on load: a 2-process FSDP2 preemption checkpoint (a folder of
    shards) resumes in 1 process with the weights 2 processes load, the same budgets and the same global batches."""
    stopped = fit_command(tmp_path, [*common(tmp_path, "fsdp2"), "--trainer.devices", "2", *FSDP2,
                                     "--trainer.callbacks+=stopping.SignalAtStep", "--trainer.callbacks.step=3"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    checkpoint = tmp_path / "logs" / "fsdp2" / "version_0" / "checkpoints" / "preempted.ckpt"
    assert checkpoint.is_dir() and (checkpoint / ".metadata").exists() and (checkpoint / "meta.pt").exists()
    assert not list(checkpoint.parent.glob(".*"))  # written under a hidden name, renamed into place
    two = run_probe(tmp_path, tmp_path / "two", [*common(tmp_path, "two"), "--trainer.devices", "2", *FSDP2], ckpt=str(checkpoint))
    one = run_probe(tmp_path, tmp_path / "one", [*common(tmp_path, "one"), "--trainer.devices", "1", *FSDP2,
                                                 "--data.batch_size", "4"], processes=1, ckpt=str(checkpoint))
    assert one[0]["policy_sharded"] and one[0]["policy_before"] == two[0]["policy_before"]
    assert [s["global_step"] for s in one[0]["steps"]] == [4, 5]
    for mine, *theirs in zip(one[0]["steps"], two[0]["steps"], two[1]["steps"]):
        assert mine["budget"] == theirs[0]["budget"] == theirs[1]["budget"]
        assert sorted(mine["draws"]) == sorted(d for t in theirs for d in t["draws"])


REUSE = ["--model.updates_per_rollout", "2"]


@pytest.mark.parametrize("strategy", [DDP[2:], FSDP2], ids=["ddp", "fsdp2"])
def test_two_updates_per_rollout_share_each_ranks_draw_and_resume_exactly_inside_a_rollout(tmp_path, strategy):
    """With two optimizer steps per rollout on two processes, each rank's two steps of a rollout train on one
    draw (the ranks' draws disjoint), and SIGTERM at the first step of the second rollout leaves a checkpoint
    inside that rollout (every rank's kept trajectory in it) which resumes to the uninterrupted run's weights."""
    two = ["--trainer.devices", "2", *strategy, *REUSE]
    full = run_probe(tmp_path, tmp_path / "full", [*common(tmp_path, "full"), *two])
    for record in full:
        steps = record["steps"]
        assert [s["global_step"] for s in steps] == list(range(2 * EPOCHS))
        for first, second in zip(steps[::2], steps[1::2]):
            assert first["draws"] == second["draws"] and first["budget"] == second["budget"]
        assert steps[0]["draws"] != steps[2]["draws"]
    for a, b in zip(full[0]["steps"], full[1]["steps"]):
        assert not {tuple(d) for d in a["draws"]} & {tuple(d) for d in b["draws"]}
    assert_trained(full)

    stopped = fit_command(tmp_path, [*common(tmp_path, "stopped"), *two, "--trainer.callbacks+=stopping.SignalAtStep",
                                     "--trainer.callbacks.step=2"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
    checkpoint = tmp_path / "logs" / "stopped" / "version_0" / "checkpoints" / "preempted.ckpt"
    resumed = run_probe(tmp_path, tmp_path / "resumed", [*common(tmp_path, "stopped"), *two], ckpt=str(checkpoint))
    assert [s["global_step"] for s in resumed[0]["steps"]] == [3, 4, 5]
    for rank in range(2):
        assert resumed[rank]["steps"][0]["draws"] == full[rank]["steps"][3]["draws"]  # the kept rollout's draw
        assert [s["loss"] for s in resumed[rank]["steps"]] == [s["loss"] for s in full[rank]["steps"][3:]]
    assert resumed[0]["policy_after"] == full[0]["policy_after"]
