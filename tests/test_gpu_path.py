"""What a GPU run depends on, checked on the CPU: devices, meshes, checkpoint loading and collectives that every
rank runs. (tests/test_gpu.py runs the loop on a real GPU where there is one.)

- every generator, loss input and logged value of a single-device run is on the strategy's root device, with the
  module's own ``device`` reading ``meta`` (the strategies of several processes: tests/test_distributed.py);
- FSDP2 shards on a mesh of the root device's type, not of where the weights were loaded;
- checkpoints load to the CPU first, whatever device wrote them;
- a trajectory kept for later updates goes into a checkpoint as CPU tensors;
- under FSDP a rank whose completions are one token wide still runs the pass the other ranks run, and its
  gradients are those of the unsharded model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from distributed_probe import free_port, run_probe, run_ranks
from rmt_lightning.runtime.checkpointing import AtomicCheckpointIO
from rmt_lightning.runtime.distributed import shard_models
from rmt_lightning.engine.forward import CompletionBatch, completion_logprobs
from rmt_lightning.engine.models import BUILTIN_TINY, load_causal_lm, model_config
from rmt_lightning.engine.generation import Rollout
from rmt_lightning.rl.trajectory import Trajectory

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")



def test_a_single_device_run_makes_everything_on_the_root_device(tmp_path):
    [record] = run_probe(tmp_path, tmp_path / "probe", [
        "--config", TINY, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.limit_val_batches", "0", "--data.cache_dir", str(tmp_path / "cache")], processes=1)
    assert record["root_device"] == "cpu" and record["parameter_devices"] == ["cpu"]
    assert record["devices_seen"] == {"generator": ["cpu"], "loss_inputs": ["cpu"], "logged": ["cpu"]}


@pytest.fixture
def one_process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("lightning_mesh", ["1d", "data_parallel x tensor_parallel 1"])
def test_fsdp2_shards_on_a_mesh_of_the_root_devices_type_not_of_the_weights_device(one_process_group, lightning_mesh):
    """In ``configure_model`` the weights are still on the CPU while the root device is a GPU; here they are on
    ``meta`` and the root device is the CPU: the mesh must follow the root device."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    if lightning_mesh == "1d":
        mesh = init_device_mesh("cpu", (1,))
    else:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(model_config(BUILTIN_TINY))
        reference = AutoModelForCausalLM.from_config(model_config(BUILTIN_TINY))
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    policy, reference = shard_models(strategy, mesh, policy, reference)
    meshes = {p.device_mesh for model in (policy, reference) for p in model.parameters()}
    assert len(meshes) == 1 and next(iter(meshes)).device_type == "cpu" and next(iter(meshes)).ndim == 1


def test_checkpoints_load_to_the_cpu_whatever_device_wrote_them(tmp_path):
    """Lightning's loader maps every storage to the CPU; the atomic loader must too (a GPU checkpoint cannot be
    written here, so the call is checked)."""
    path = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)
    original = torch.load
    with mock.patch.object(torch, "load", side_effect=original) as load:
        AtomicCheckpointIO().load_checkpoint(path)
    assert load.call_args.kwargs["map_location"] == "cpu"
    with mock.patch.object(torch, "load", side_effect=original) as load:
        AtomicCheckpointIO().load_checkpoint(path, map_location="meta")
    assert load.call_args.kwargs["map_location"] == "meta"


def test_a_kept_trajectory_goes_into_a_checkpoint_as_cpu_tensors():
    """Every tensor of ``Trajectory.state_dict`` is copied with ``.cpu()`` and detached: the reference's and
    pi_old's log-probs are made on the GPU in a GPU run."""
    rollout = Rollout(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool),
                           torch.ones(2, 3, dtype=torch.bool), ["a", "b"], [1, 1], [False, False], [False, False])
    logprobs = torch.zeros(2, 3, requires_grad=True)
    trajectory = Trajectory([[1, 2]], rollout, torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(2),
                            drawn_at_step=3, reference_logprobs={0: logprobs}, old_logprobs={0: logprobs, 1: logprobs})
    original, copied = torch.Tensor.cpu, []

    def cpu(tensor, *args, **kwargs):
        copied.append(tensor)
        return original(tensor, *args, **kwargs)

    with mock.patch.object(torch.Tensor, "cpu", cpu):
        state = trajectory.state_dict()
    tensors = [state["rollout"]["completion_ids"], state["rollout"]["completion_mask"], state["rollout"]["sampled_mask"],
               state["rewards"], state["correct"], state["length"], state["advantages"],
               state["reference_logprobs"][0], state["old_logprobs"][0], state["old_logprobs"][1]]
    assert len(copied) == len(tensors) == 10
    assert all(t.device.type == "cpu" and not t.requires_grad for t in tensors)
    restored = Trajectory.from_state_dict(state)
    assert restored.drawn_at_step == 3 and sorted(restored.old_logprobs) == [0, 1]


def _completion_pass(rank: int, port: int, out: str) -> None:
    """Rank 0 scores completions one token wide, rank 1 five wide, with FSDP2-sharded weights."""
    from rmt_lightning.runtime.distributed import shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = shard_model(load_causal_lm(BUILTIN_TINY), None)
    inputs = _inputs(rank)

    def all_agree(flag: bool) -> bool:
        value = torch.tensor(float(flag))
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value > 0)

    logprobs = completion_logprobs(model, CompletionBatch(*inputs, group_size=2), all_agree=all_agree)
    logprobs.sum().backward()
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    torch.save({"logprobs": logprobs.detach(), "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _inputs(rank: int):
    width = 1 if rank == 0 else 5
    generator = torch.Generator().manual_seed(rank)
    prompt_ids = torch.randint(3, 60, (1, 6), generator=generator)
    completion_ids = torch.randint(3, 60, (2, width), generator=generator)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, torch.ones_like(completion_ids)


def test_a_rank_with_one_token_wide_completions_runs_the_pass_the_other_ranks_run(tmp_path):
    run_ranks(_completion_pass, str(tmp_path), timeout=120)

    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    model = load_causal_lm(BUILTIN_TINY)
    expected_grads = []
    for rank, result in enumerate(results):
        model.zero_grad()
        logprobs = completion_logprobs(model, CompletionBatch(*_inputs(rank), group_size=2))
        torch.testing.assert_close(result["logprobs"], logprobs.detach())
        logprobs.sum().backward()
        expected_grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    # FSDP averages the ranks' gradients: the one-token-wide rank's pass adds nothing and loses nothing.
    for name, grad in results[0]["grads"].items():
        torch.testing.assert_close(grad, (expected_grads[0][name] + expected_grads[1][name]) / 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gather", [True, False])
def test_the_module_hands_rollouts_its_gathering_choice_and_no_agreement_when_unsharded(monkeypatch, gather):
    import rmt_lightning.grpo_module as module_file  # the shared step decodes every task's rollouts
    from rmt_lightning import RMTModule

    captured = {}
    monkeypatch.setattr(module_file, "generate_group",
                        lambda model, tokenizer, prompts, settings, options, **kwargs: captured.update(options=options, **kwargs))
    module = RMTModule(model_name_or_path=BUILTIN_TINY, gather_weights_for_rollouts=gather)
    module.configure_model()
    module.generate_rollout([[5, 6, 7]], budget=2)
    assert captured["options"].gather_weights is gather and captured["all_finished"] is None
    assert captured["generator"].device == torch.device("cpu")


def test_weights_too_large_to_gather_for_a_rollout_name_the_setting_that_avoids_it(one_process_group, monkeypatch):
    from contextlib import contextmanager

    from rmt_lightning.engine import decoding_weights as preparing
    from rmt_lightning.runtime.distributed import shard_model

    @contextmanager
    def out_of_memory(modules):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        yield

    monkeypatch.setattr(preparing, "_fsdp2_gathered", out_of_memory)
    model = shard_model(load_causal_lm(BUILTIN_TINY), None)
    with pytest.raises(torch.OutOfMemoryError, match="gather_weights_for_rollouts false"):
        with preparing.decoding_weights(model):
            pass
