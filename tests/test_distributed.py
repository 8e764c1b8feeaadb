"""DDP, FSDP1 (Lightning's FSDPStrategy) and FSDP2 (Lightning's ModelParallelStrategy with ``fully_shard``) over
the whole RMT loop, with two real CPU processes (gloo): one budget on every rank, disjoint curriculum shards that
add up to a single-process draw, finite losses, a policy that moves, a reference that does not, a checkpoint
that resumes, and a full checkpoint that validates and exports in one process. Also: sharded generation does
not deadlock when one rank generates far longer than the other.

Lightning allows FSDP1 on GPUs only; the tests run it on CPU through ``distributed_probe.CPUFSDPStrategy``."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist

from distributed_probe import assert_trained, run_probe, run_ranks
from rmt_lightning.cli import build_cli
from rmt_lightning.runtime.distributed import shard_model, wrap_fsdp1
from rmt_lightning.method import token_budget
from rmt_lightning.engine.models import BUILTIN_TINY, load_causal_lm, load_tokenizer
from generate import generate

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
EPOCHS = 2
STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp1": ["--trainer.strategy.class_path", "distributed_probe.CPUFSDPStrategy"],
    "fsdp2": ["--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy"],
}

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _probe(workdir: Path, out: Path, strategy: str, epochs: int, ckpt: str = "none", extra=()) -> list[dict]:
    args = ["--config", TINY, "--trainer.devices", "2", *STRATEGIES[strategy], "--trainer.max_epochs", str(epochs),
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0",
            "--data.cache_dir", str(workdir / "cache"), *extra]
    return run_probe(workdir, out, args, processes=2, ckpt=ckpt)


@pytest.fixture(scope="module", params=sorted(STRATEGIES))
def runs(request, tmp_path_factory):
    """A 2-epoch run under the strategy, then a resumed run from its last checkpoint for one more epoch."""
    strategy = request.param
    workdir = tmp_path_factory.mktemp(strategy)
    first = _probe(workdir, workdir / "first", strategy, EPOCHS)
    checkpoint = workdir / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    resumed = _probe(workdir, workdir / "resumed", strategy, EPOCHS + 1, ckpt=str(checkpoint))
    return strategy, workdir, first, resumed


def test_everything_the_module_makes_is_on_the_strategys_root_device(runs):
    """Every generator the module makes, tensor it hands the losses and value it logs, and every weight of the
    policy and the reference, is on the strategy's root device, on every rank, also after a resume; the probe runs
    with the module's own ``device`` reading ``meta``, so code that takes the module's device instead of the root
    device fails this (under FSDP1 on a GPU the two differ). FSDP2 shards on a mesh of the root device's type."""
    strategy, _, first, resumed = runs
    for record in first + resumed:
        root = record["root_device"]
        assert record["parameter_devices"] == [root]
        assert record["devices_seen"] == {"generator": [root], "loss_inputs": [root], "logged": [root]}
        assert record["mesh_device_type"] == (torch.device(root).type if strategy == "fsdp2" else None)


def test_rollouts_make_no_agreement_per_decoding_step(runs):
    """Under DDP a rollout's forwards are each process's own; under FSDP1 and FSDP2 its weights are gathered once
    (those all-gathers are counted in tests/test_decoding_weights.py), so no process waits for the others at each
    decoding step: no all-reduce or barrier while a rollout generates (each wait was one of each). The step itself
    still reduces."""
    _, _, first, _ = runs
    for record in first:
        assert record["collectives"]["in_rollouts"] == 0 and record["collectives"]["calls"] > 0, record["collectives"]


def _single_process_draws(workdir: Path, epochs: int) -> list[list[list[int]]]:
    """What one process draws with the same seed for the global batch of both ranks (2 x batch_size)."""
    cli = build_cli(["--config", TINY, "--data.batch_size", "4", "--data.cache_dir", str(workdir / "cache")], run=False)
    datamodule = cli.datamodule
    datamodule.trainer = L.Trainer(max_epochs=epochs, logger=False, accelerator="cpu", devices=1)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    draws = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            draws.append([[int(d), int(p)] for d, p in zip(batch.position_documents.tolist(), batch.positions.tolist())])
    return draws


def test_both_ranks_ran_every_step_with_the_same_budget(runs):
    strategy, _, first, _ = runs
    assert [r["world_size"] for r in first] == [2, 2]
    steps = [r["steps"] for r in first]
    assert len(steps[0]) == len(steps[1]) == EPOCHS * 2
    for a, b in zip(*steps):
        assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
        assert a["budget"] == b["budget"] == token_budget(a["epoch"] / EPOCHS, 8, 2, 0.25)


def test_ranks_draw_disjoint_shares_that_add_up_to_one_process_draw(runs):
    _, workdir, first, _ = runs
    single = _single_process_draws(workdir, EPOCHS)
    for step, (a, b) in enumerate(zip(first[0]["steps"], first[1]["steps"])):
        ours, theirs = {tuple(x) for x in a["draws"]}, {tuple(x) for x in b["draws"]}
        assert len(ours) == len(a["draws"]) == 2 and not ours & theirs, f"step {step}: shares overlap"
        assert sorted(a["draws"] + b["draws"]) == sorted(single[step]), f"step {step}"


def test_losses_finite_policy_moved_reference_frozen(runs):
    strategy, _, first, _ = runs
    for record in first:
        assert record["policy_sharded"] is (strategy != "ddp")
        assert record["reference_sharded"] is (strategy != "ddp")
    assert_trained(first)
    if strategy == "ddp":
        assert first[1]["policy_after"] == first[0]["policy_after"], "DDP replicas diverged"


def test_checkpoint_resumes_where_the_run_stopped(runs):
    _, _, first, resumed = runs
    for before, after in zip(first, resumed):
        assert after["start_step"] == EPOCHS * 2
        assert after["policy_before"] == before["policy_after"]
        assert [s["epoch"] for s in after["steps"]] == [EPOCHS, EPOCHS]
        assert all(s["budget"] == token_budget(EPOCHS / (EPOCHS + 1), 8, 2, 0.25) for s in after["steps"])
    assert resumed[0]["steps"][0]["budget"] == resumed[1]["steps"][0]["budget"]


def test_sharded_fsdp1_checkpoint_resumes_with_the_same_per_step_budget_on_both_ranks(tmp_path):
    """FSDP1 with ``state_dict_type: sharded`` writes a folder of per-rank shards, and a run resumes from it; the
    budget, decayed per step here, is the same on both ranks at every step, before and after the resume. The
    runs use activation checkpointing, the option that saves memory under FSDP."""
    step_budget = tmp_path / "step_budget.yaml"
    step_budget.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: rmt_lightning.TokenBudget\n"
        "      init_args: {b0: 8, b_min: 2, gamma: 0.25, granularity: step}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true}\n"
    )
    extra = ["--config", str(step_budget), "--trainer.strategy.init_args.state_dict_type", "sharded",
             "--model.gradient_checkpointing", "true"]
    first = _probe(tmp_path, tmp_path / "first", "fsdp1", 1, extra=extra)
    checkpoint = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2
    resumed = _probe(tmp_path, tmp_path / "resumed", "fsdp1", 2, ckpt=str(checkpoint), extra=extra)
    for before, after in zip(first, resumed):
        assert after["start_step"] == 2 and [s["epoch"] for s in after["steps"]] == [1, 1]
        assert after["policy_before"] == before["policy_after"]
        assert before["policy_before"] != before["policy_after"]
    for records, total_steps in ((first, 2), (resumed, 4)):
        budgets = [[s["budget"] for s in record["steps"]] for record in records]
        expected = [token_budget(s["global_step"] / total_steps, 8, 2, 0.25) for s in records[0]["steps"]]
        assert budgets[0] == budgets[1] == expected
    assert len(set(first[0]["steps"][i]["budget"] for i in range(2)) | {resumed[0]["steps"][-1]["budget"]}) > 1


def test_full_checkpoint_validates_and_exports_in_one_process(runs, tmp_path):
    """DDP and FSDP1 (full state dict by default) write one file that a single process validates and exports;
    FSDP2's default sharded folder is refused by export with the option that writes a file instead."""
    from distributed_probe import _checksums
    from transformers import AutoModelForCausalLM

    strategy, workdir, _, resumed = runs
    checkpoint = workdir / "logs" / "tiny" / "version_1" / "checkpoints" / "last.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    exported = tmp_path / "exported"
    export = [sys.executable, "-m", "rmt_lightning", "export", str(checkpoint), str(exported)]
    if strategy == "fsdp2":
        assert checkpoint.is_dir()
        result = subprocess.run(export, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode != 0 and "save_distributed_checkpoint false" in result.stderr
        return
    assert checkpoint.is_file()
    validate = [sys.executable, "-m", "rmt_lightning", "validate", "--config", TINY, "--ckpt_path", str(checkpoint),
                "--data.cache_dir", str(workdir / "cache"), "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(validate, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "val/ntp_acc_avg" in result.stdout
    result = subprocess.run(export, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _checksums(AutoModelForCausalLM.from_pretrained(exported)) == resumed[0]["policy_after"]


# ---- generation with uneven lengths under FSDP1 and FSDP2 --------------------------------------------


def _uneven_generation(rank: int, port: int, out: str, sharding: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(BUILTIN_TINY)
    model = load_causal_lm(BUILTIN_TINY)
    model = shard_model(model, None) if sharding == "fsdp2" else wrap_fsdp1(model, torch.device("cpu"), use_orig_params=True)
    prompts = [tokenizer("three four five", add_special_tokens=False)["input_ids"]]

    def all_finished(done: bool) -> bool:
        flag = torch.tensor(float(done))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag > 0)

    # Rank 0 stops after 2 tokens, rank 1 writes 40. With the weights left sharded (the path rollouts take where
    # they cannot be gathered once; tests/test_decoding_weights.py covers the gathered one), every decoding step
    # of rank 1 needs rank 0's shards.
    cap = 2 if rank == 0 else 40
    rollout = generate(model, tokenizer, prompts, 2, think_cap=cap, answer_allowance=0, temperature=1.0,
                             generator=torch.Generator().manual_seed(5), all_finished=all_finished,
                             gather_weights=False)
    # Gradient clipping must see the global norm: Lightning clips FSDP2 gradients with clip_grad_norm_, the
    # module clips FSDP1 gradients with the FSDP root's own clip_grad_norm_.
    ids = torch.tensor([prompts[0] * 2])
    model(input_ids=ids, labels=ids).loss.backward()
    if sharding == "fsdp2":
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    else:
        norm = model.clip_grad_norm_(1e9)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    torch.save({"ids": rollout.completion_ids, "mask": rollout.completion_mask, "grad_norm": norm}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2"])
def test_sharded_generation_with_uneven_lengths_finishes_and_matches_one_process_and_clips_globally(tmp_path, sharding):
    run_ranks(_uneven_generation, str(tmp_path), sharding, timeout=300)
    short, long = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert short["mask"].sum(1).tolist() == [2, 2]
    assert long["mask"].sum(1).tolist() == [40, 40]

    # The sharded model generates exactly what the unsharded one does.
    tokenizer = load_tokenizer(BUILTIN_TINY)
    prompts = [tokenizer("three four five", add_special_tokens=False)["input_ids"]]
    alone = generate(load_causal_lm(BUILTIN_TINY), tokenizer, prompts, 2, think_cap=40, answer_allowance=0,
                           temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(alone.completion_ids, long["ids"])

    model = load_causal_lm(BUILTIN_TINY)
    ids = torch.tensor([prompts[0] * 2])
    model(input_ids=ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    torch.testing.assert_close(short["grad_norm"], norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(long["grad_norm"], norm, rtol=1e-5, atol=0)


def test_completions_table_gathers_every_rank(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, workdir, _, _ = runs
    events = EventAccumulator(str(workdir / "logs" / "tiny" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("completions/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = table.strip().split("\n")[2:]
    # tiny.yaml: 2 positions per rank, one completion shown per position.
    assert len(rows) == 2 * 2, table


def test_full_fsdp2_checkpoint_validates_and_exports_in_one_process(tmp_path):
    from distributed_probe import _checksums
    from transformers import AutoModelForCausalLM

    full = ["--trainer.strategy.init_args.save_distributed_checkpoint", "false"]
    records = _probe(tmp_path, tmp_path / "run", "fsdp2", 1, extra=full)
    checkpoint = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file(), "FSDP2 wrote no single-file checkpoint"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    validate = [sys.executable, "-m", "rmt_lightning", "validate", "--config", TINY, "--ckpt_path", str(checkpoint),
                "--data.cache_dir", str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false"]
    result = subprocess.run(validate, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "val/ntp_acc_avg" in result.stdout

    exported = tmp_path / "exported"
    export = [sys.executable, "-m", "rmt_lightning", "export", str(checkpoint), str(exported)]
    result = subprocess.run(export, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _checksums(AutoModelForCausalLM.from_pretrained(exported)) == records[0]["policy_after"]
