"""The question task under DDP, FSDP1 and FSDP2 with two real CPU processes (gloo), as the next-token task is tested in
test_distributed.py: each rank its own share of every step's questions, a policy that moves, everything on the
strategy's root device, no agreement per decoding step, and a checkpoint that resumes where the run stopped."""

from pathlib import Path

import pytest
import torch.distributed as dist

from distributed_probe import assert_trained, run_probe
from rmt_lightning.engine.models import BUILTIN_TINY

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = str(ROOT / "configs" / "posttrain" / "builtin.yaml")
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp1": ["--trainer.strategy.class_path", "distributed_probe.CPUFSDPStrategy"],
    "fsdp2": ["--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy"],
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _probe(workdir: Path, out: Path, strategy: str, steps: int, ckpt: str = "none") -> list[dict]:
    args = ["--config", BUILTIN, "--trainer.devices", "2", *STRATEGIES[strategy], "--trainer.max_steps", str(steps),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--model.model_name_or_path", BUILTIN_TINY, "--model.max_response_length", "4", "--model.group_size", "4",
            "--model.lr", "1e-3", "--model.beta", "0.05", "--data.embedded_questions", "64", "--data.val_questions", "8",
            "--data.batch_size", "2", "--data.batches_per_epoch", "3"]
    return run_probe(workdir, out, args, processes=2, ckpt=ckpt)


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def runs(request, tmp_path_factory):
    """4 steps under the strategy (across an epoch end), then, under FSDP2, a run resumed from its last checkpoint to
    6 (DDP's resume is the next-token task's, tests/test_distributed.py, on the same shared step and hooks)."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RMT_PROBE_TOY_REWARD", "1")  # the tiny model never writes an answer: a reward it controls
    try:
        workdir = tmp_path_factory.mktemp(f"posttrain-{request.param}")
        first = _probe(workdir, workdir / "first", request.param, 4)
        checkpoint = workdir / "logs" / "posttrain_builtin" / "version_0" / "checkpoints" / "last.ckpt"
        assert checkpoint.exists()
        resumed = []
        if request.param == "fsdp2":
            resumed = _probe(workdir, workdir / "resumed", request.param, 6, ckpt=str(checkpoint))
    finally:
        monkeypatch.undo()
    return request.param, first, resumed, workdir


def test_each_rank_trains_its_own_share_of_every_steps_questions(runs):
    _, first, resumed, _ = runs
    for records in (first, resumed):
        if not records:
            continue
        assert [r["world_size"] for r in records] == [2, 2]
        for step0, step1 in zip(records[0]["steps"], records[1]["steps"]):
            assert step0["global_step"] == step1["global_step"]
            ids0, ids1 = {q for (q,) in step0["draws"]}, {q for (q,) in step1["draws"]}
            assert len(ids0) == len(ids1) == 2 and not ids0 & ids1


def test_the_policy_moves_and_the_reference_does_not(runs):
    _, first, _, _ = runs
    assert_trained(first)


def test_everything_is_on_the_root_device_and_rollouts_wait_for_no_other_rank(runs):
    _, first, resumed, _ = runs
    for record in first + resumed:
        root = record["root_device"]
        assert record["parameter_devices"] == [root]
        assert record["devices_seen"] == {"generator": [root], "loss_inputs": [root], "logged": [root]}
    for record in first:
        assert record["collectives"]["in_rollouts"] == 0 and record["collectives"]["calls"] > 0


def test_the_checkpoint_resumes_where_the_run_stopped(runs):
    strategy, first, resumed, _ = runs
    if strategy != "fsdp2":
        pytest.skip("resumed under FSDP2 only")
    assert [r["start_step"] for r in resumed] == [4, 4]
    assert [s["global_step"] for s in resumed[0]["steps"]] == [4, 5]
    # The resumed steps draw what the 6-step run would: the epoch of 3 steps goes on from where it stopped.
    assert all(len(s["draws"]) == 2 for r in resumed for s in r["steps"])


def test_the_run_exports_a_model_transformers_loads(runs):
    from transformers import AutoModelForCausalLM

    *_, workdir = runs
    export = workdir / "logs" / "posttrain_builtin" / "version_0" / "hf_export"
    assert AutoModelForCausalLM.from_pretrained(export).num_parameters() > 0
