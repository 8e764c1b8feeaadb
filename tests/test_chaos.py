"""Chaos: a training run SIGKILLed at random moments (inside training steps, inside a checkpoint write, while the
first run builds the entropy cache) and resumed with ``--ckpt_path last`` after each kill ends with the same
weights and per-step losses as an uninterrupted run, with no corrupt checkpoint or cache on the way and at most
the step in flight lost per kill (``tests/chaos.py`` does the runs and the checks).

A run resumed from a checkpoint of an epoch's last step, then resumed again from a checkpoint it wrote in the
next epoch, is checked on its own, without kills: the chaos run can land there only by chance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chaos import CACHE, CHECKPOINT, losses, run_chaos, write_config
from rmt_lightning.cli import build_cli


def test_kills_at_random_moments_lose_at_most_the_step_in_flight_and_change_nothing(tmp_path):
    summary = run_chaos(tmp_path, kills=5, seed=1, every_n_steps=1, epochs=2, batches_per_epoch=6)
    details = f"\n{summary['problems']}\n{summary['records']}"
    assert summary["kills"] >= 5, details
    assert summary["landed"][0] == CACHE and CHECKPOINT in summary["landed"], details
    assert summary["corrupt_checkpoints"] == 0 and summary["corrupt_caches"] == 0, details
    assert summary["checkpoints_verified"] > 0 and summary["rebuilt_cache_equal"], details
    assert all(lost is not None and lost <= 1 for lost in summary["steps_lost"]), details
    assert summary["final_step"] == summary["total_steps"] == 12, details
    assert summary["final_weights_equal"] and summary["max_abs_weight_diff"] == 0.0, details
    assert summary["losses_equal"] and summary["loss_steps_compared"] == 12, details
    assert summary["leftover_process_groups"] == 0, details
    assert summary["ok"], details


# ---- resuming twice across an epoch's end ----------------------------------------------------------------------

def fit(config: Path, *args):
    """Per-step losses, final policy weights and global step of ``fit --config config *args`` (in this process)."""
    cli = build_cli(["fit", "--config", str(config), *args])
    return losses(Path(cli.trainer.logger.log_dir)), cli.model.policy.state_dict(), cli.trainer.global_step


def periodic(folder: Path, name: str, step: int) -> str:
    return str(folder / "logs" / name / "version_0" / "checkpoints" / f"periodic-step={step:08d}.ckpt")


@pytest.fixture(scope="module")
def across_an_epoch_end(tmp_path_factory):
    """2 epochs of 3 steps: uninterrupted, and resumed from the checkpoint of step 3 (epoch 0's last)."""
    folder = tmp_path_factory.mktemp("epoch-end")

    def config(name):
        return write_config(folder, name, every_n_steps=1, epochs=2, batches_per_epoch=3, keep_last=10, cache_dir=folder / "cache")

    full = fit(config("full"))
    assert full[2] == 6 and sorted(full[0]) == list(range(6))
    resumed = fit(config("resumed"), "--ckpt_path", periodic(folder, "full", 3))
    return folder, config, full, resumed


def assert_same_run(run, full, first_step: int) -> None:
    run_losses, params, steps = run
    full_losses, full_params, full_steps = full
    assert steps == full_steps
    assert run_losses == {s: v for s, v in full_losses.items() if s >= first_step}, (run_losses, full_losses)
    for name, value in full_params.items():
        assert torch.equal(params[name], value), name


def test_resume_from_an_epochs_last_step_is_exact(across_an_epoch_end):
    _, _, full, resumed = across_an_epoch_end
    assert_same_run(resumed, full, first_step=3)


@pytest.mark.parametrize("step", [4, 5], ids=["first-step-of-the-next-epoch", "later-in-the-next-epoch"])
def test_second_resume_in_the_epoch_after_an_epoch_end_resume_is_exact(across_an_epoch_end, step):
    folder, config, full, _ = across_an_epoch_end
    again = fit(config(f"again-from-{step}"), "--ckpt_path", periodic(folder, "resumed", step))
    assert_same_run(again, full, first_step=step)
