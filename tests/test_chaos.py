"""Chaos: a training run SIGKILLed at random moments (inside training steps, inside a checkpoint write, while the
first run builds the entropy cache) and resumed with ``--ckpt_path last`` after each kill ends with the same
weights and per-step losses as an uninterrupted run, with no corrupt checkpoint or cache on the way and at most
the step in flight lost per kill (``tests/chaos.py`` does the runs and the checks)."""

from __future__ import annotations

from chaos import CACHE, CHECKPOINT, run_chaos


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
