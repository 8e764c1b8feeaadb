"""Rollouts decode on weights prepared once: under autocast cast once to its dtype (the same tokens as the pure
bfloat16 model, a bfloat16 key/value cache, the float32 weights restored, also after an exception), and under
FSDP2 and FSDP1 gathered once (no collective per decoding step, the unsharded model's tokens, ranks that stop at
their own lengths, the weights sharded again afterwards with the same values, and training that still works)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from distributed_probe import run_ranks
from rmt_lightning.engine import prepacked
from rmt_lightning.engine.decoding_weights import DecodingWeights, decoding_weights
from rmt_lightning.engine.models import BUILTIN_TINY, load_causal_lm, load_tokenizer
from generate import generate

SEED = 5


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("three four five", "one two")]


def _rollout(model, tokenizer, cap: int, prompts=None, **kwargs):
    return generate(model, tokenizer, prompts or _prompts(tokenizer), 2, think_cap=cap, answer_allowance=0,
                          temperature=1.0, generator=torch.Generator().manual_seed(SEED), **kwargs)


def _pure_bf16():
    """The tiny model in bfloat16 (its rotary buffers stay float32, as ``load_causal_lm`` keeps them)."""
    return load_causal_lm(BUILTIN_TINY).to(torch.bfloat16)


def _snapshot(model) -> list[tuple[nn.Parameter, int, torch.Tensor]]:
    return [(p, p.data_ptr(), p.detach().clone()) for p in model.parameters()]


def _assert_restored(model, snapshot) -> None:
    """The same parameter objects, on the same storage, with the same float32 values."""
    params = list(model.parameters())
    assert len(params) == len(snapshot)
    for param, (before, pointer, values) in zip(params, snapshot):
        assert param is before and param.data_ptr() == pointer
        assert param.dtype == torch.float32 and torch.equal(param, values)


def _caches(model) -> list:
    """The key/value caches the model's forwards receive, recorded as they come."""
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("cache")), with_kwargs=True)
    return seen


def _raise_on_call(module: nn.Module, call: int):
    calls = []

    def hook(*_):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("failed inside the rollout")

    return module.register_forward_hook(hook)


def _mlp(model) -> nn.Module:
    return next(m for m in model.modules() if type(m).__name__ == "LlamaMLP")


@torch.no_grad()
def test_under_autocast_the_rollout_decodes_on_weights_cast_once_like_the_pure_bf16_model(tokenizer):
    model = load_causal_lm(BUILTIN_TINY)
    snapshot = _snapshot(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    seen = []  # (layer, weight storage, weight dtype, autocast on) at every product
    for i, linear in enumerate(linears):
        linear.register_forward_pre_hook(lambda module, args, i=i: seen.append(
            (i, module.weight.data_ptr(), module.weight.dtype, torch.is_autocast_enabled("cpu"))))
    caches = _caches(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        rollout = _rollout(model, tokenizer, 20)
        assert torch.is_autocast_enabled("cpu")
    expected = _rollout(_pure_bf16(), tokenizer, 20)

    assert torch.equal(rollout.completion_ids, expected.completion_ids)
    assert rollout.completion_mask.sum().item() == 4 * 20
    assert {(dtype, autocast) for _, _, dtype, autocast in seen} == {(torch.bfloat16, False)}
    # One copy per weight for the whole rollout (prefill and every step), none of them the float32 original.
    by_layer = {}
    for i, pointer, _, _ in seen:
        by_layer.setdefault(i, set()).add(pointer)
    assert len(by_layer) == len(linears) and all(len(pointers) == 1 for pointers in by_layer.values())
    originals = {p.data_ptr() for p in model.parameters()}
    assert not {pointer for pointers in by_layer.values() for pointer in pointers} & originals
    last = caches[-1].layers[0]
    assert last.prompt_keys.dtype == last.keys.dtype == torch.bfloat16
    _assert_restored(model, snapshot)


@torch.no_grad()
def test_the_cast_weights_are_restored_when_the_rollout_raises(tokenizer):
    model = load_causal_lm(BUILTIN_TINY)
    snapshot = _snapshot(model)
    handle = _raise_on_call(_mlp(model), 3)  # the second decoding step
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with pytest.raises(RuntimeError, match="inside the rollout"):
            _rollout(model, tokenizer, 20)
        assert torch.is_autocast_enabled("cpu")
    handle.remove()
    _assert_restored(model, snapshot)
    assert model.training is False  # load_causal_lm's mode, put back by the rollout
    fresh = load_causal_lm(BUILTIN_TINY)
    assert torch.equal(_rollout(model, tokenizer, 5).completion_ids, _rollout(fresh, tokenizer, 5).completion_ids)


@torch.no_grad()
def test_outside_autocast_or_at_the_weights_own_dtype_the_model_is_left_as_it_is():
    model = load_causal_lm(BUILTIN_TINY)
    pointers = [p.data_ptr() for p in model.parameters()]
    with decoding_weights(model) as weights:
        assert weights == DecodingWeights(gathered=False, dtype=None)
        assert [p.data_ptr() for p in model.parameters()] == pointers
    bf16 = _pure_bf16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with decoding_weights(bf16) as weights:
            assert weights == DecodingWeights(gathered=False, dtype=None) and torch.is_autocast_enabled("cpu")
        with decoding_weights(model) as weights:
            assert weights == DecodingWeights(gathered=False, dtype=torch.bfloat16)
            assert not torch.is_autocast_enabled("cpu")
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a PyTorch built with oneDNN")
@torch.no_grad()
def test_prepacking_still_applies_to_float32_decoding_and_not_to_the_cast_weights(tokenizer, monkeypatch):
    monkeypatch.setattr(prepacked, "MIN_PACKED_WEIGHT", 1)
    model = load_causal_lm(BUILTIN_TINY)
    packed = []  # per product: whether the layer multiplies by a packed copy
    for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
        linear.register_forward_pre_hook(lambda module, args: packed.append("forward" in vars(module)))
    _rollout(model, tokenizer, 6)
    assert any(packed), "float32 decoding steps on a CPU multiply by packed weights"
    packed.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        _rollout(model, tokenizer, 6)
    assert packed and not any(packed)


# ---- FSDP2 and FSDP1: two gloo processes ---------------------------------------------------------------


class _Collectives(TorchDispatchMode):
    """Counts the collectives issued on this process: every path to the backend (``torch.distributed``'s functions,
    FSDP1's and FSDP2's gathers, functional collectives) dispatches a ``c10d`` or ``_c10d_functional`` operator."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional") and "wait" not in func.__name__:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _local_shards(model, sharding: str) -> list[torch.Tensor]:
    """This rank's shards: FSDP2's DTensor parameters' local parts, FSDP1's flat parameters."""
    if sharding == "fsdp2":
        from torch.distributed.tensor import DTensor

        assert all(isinstance(p, DTensor) for p in model.parameters())
        return [p.to_local().detach().clone() for p in model.parameters()]
    from torch.distributed.fsdp import FullyShardedDataParallel

    handles = [m._handle for m in FullyShardedDataParallel.fsdp_modules(model) if m._handle is not None]
    for handle in handles:
        flat = handle.flat_param
        assert flat.numel() < sum(flat._numels), "the flat parameter holds more than this rank's shard"
        # Allocated by FSDP1's first gather, freed by every reshard.
        full = getattr(flat, "_full_param_padded", None)
        assert full is None or full.untyped_storage().size() == 0, "the gathered weights were not freed"
    assert all("forward" not in vars(m) for m in FullyShardedDataParallel.fsdp_modules(model))
    return [h.flat_param.detach().clone() for h in handles]


def _reshard_settings(model) -> list[tuple[bool, list[bool]]]:
    """Per FSDP2 module: its automatic reshard-after-forward flag and whether each group reshards after forward."""
    from torch.distributed.fsdp import FSDPModule

    states = [m._get_fsdp_state() for m in model.modules() if isinstance(m, FSDPModule)]
    return [(s._auto_reshard_after_forward, [g.post_forward_mesh_info is not None for g in s._fsdp_param_groups])
            for s in states]


def _sharded_worker(rank: int, port: int, out: str, sharding: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from rmt_lightning.runtime.distributed import shard_model, wrap_fsdp1

    def sharded(**fsdp1_kwargs):
        model = load_causal_lm(BUILTIN_TINY)
        if sharding == "fsdp2":
            return shard_model(model, None)
        return wrap_fsdp1(model, torch.device("cpu"), use_orig_params=True, **fsdp1_kwargs)

    tokenizer = load_tokenizer(BUILTIN_TINY)
    prompts = _prompts(tokenizer)[:1]
    model = sharded()
    shards = _local_shards(model, sharding)
    asked = []

    def all_finished(done: bool) -> bool:
        asked.append(done)
        flag = torch.tensor(float(done))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag > 0)

    record = {}

    def rollout(name: str, cap: int, **kwargs) -> None:
        asked.clear()
        with _Collectives() as collectives:
            result = _rollout(model, tokenizer, cap, prompts, all_finished=all_finished, **kwargs)
        record[name] = {"ids": result.completion_ids, "lengths": result.completion_mask.sum(1).tolist(),
                        "collectives": collectives.count, "asked": len(asked)}

    # The very first forward is a rollout (FSDP's lazy initialisation runs inside it), with uneven lengths: rank 0
    # writes 2 tokens, rank 1 writes 20; then the other way round.
    rollout("uneven", 2 if rank == 0 else 20)
    rollout("swapped", 20 if rank == 0 else 2)
    record["sharded_after_rollouts"] = all(torch.equal(a, b) for a, b in zip(_local_shards(model, sharding), shards))

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        caches = _caches(model)
        rollout("autocast", 20)
    record["autocast_cache_dtype"] = str(caches[-1].layers[0].keys.dtype)

    handle = _raise_on_call(_mlp(model), 3)
    try:
        _rollout(model, tokenizer, 20, prompts)
        record["raised"] = False
    except RuntimeError:
        record["raised"] = True
    handle.remove()
    record["sharded_after_exception"] = all(torch.equal(a, b) for a, b in zip(_local_shards(model, sharding), shards))

    # Today's path, where each step gathers and the processes agree on stopping: the count grows with the steps.
    # (FSDP1's and FSDP2's roots then keep their gathered weights after forward, until a backward.)
    rollout("per_step_2", 2, gather_weights=False)
    rollout("per_step_6", 6, gather_weights=False)

    # Training after the rollouts: forward, backward, global gradient norm; the weights are sharded again.
    ids = torch.tensor([prompts[0] * 2])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    if sharding == "fsdp2":
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    else:
        norm = model.clip_grad_norm_(1e9)
    record["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    record["sharded_after_training"] = all(torch.equal(a, b) for a, b in zip(_local_shards(model, sharding), shards))
    if sharding == "fsdp2":
        # What a model that only ever trained has: the root keeps its weights after forward, the layers reshard.
        trained = sharded()
        trained(input_ids=ids, labels=ids).loss.backward()
        record["settings"], record["trained_settings"] = _reshard_settings(model), _reshard_settings(trained)
    else:
        from torch.distributed.fsdp import MixedPrecision

        # FSDP1 gathers full precision whatever its mixed precision: the weights are cast once to its param_dtype.
        model = sharded(mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))
        shards = _local_shards(model, sharding)
        rollout("fsdp1_mixed_precision", 20)
        after = _local_shards(model, sharding)
        record["sharded_after_mixed_precision"] = all(torch.equal(a, b) and a.dtype == torch.float32
                                                      for a, b in zip(after, shards))
    torch.save(record, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2"])
def test_sharded_rollouts_gather_once_and_decode_without_collectives(tmp_path, tokenizer, sharding):
    run_ranks(_sharded_worker, str(tmp_path), sharding, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    prompts = _prompts(tokenizer)[:1]
    alone = {cap: _rollout(load_causal_lm(BUILTIN_TINY), tokenizer, cap, prompts).completion_ids for cap in (2, 6, 20)}
    bf16 = _rollout(_pure_bf16(), tokenizer, 20, prompts).completion_ids
    for rank, record in enumerate(ranks):
        uneven, swapped = record["uneven"], record["swapped"]
        # Each rank stops at its own length, with the unsharded model's tokens, asking the other rank nothing.
        assert uneven["lengths"] == ([2, 2] if rank == 0 else [20, 20])
        assert swapped["lengths"] == ([20, 20] if rank == 0 else [2, 2])
        assert torch.equal(uneven["ids"], alone[2 if rank == 0 else 20])
        assert torch.equal(swapped["ids"], alone[20 if rank == 0 else 2])
        assert uneven["asked"] == swapped["asked"] == 0
        # Gathering once: as many collectives for 2 tokens as for 20 (one all-gather per FSDP unit).
        assert uneven["collectives"] == swapped["collectives"] == 3
        # The count sees per-step collectives where they happen.
        per_step_2, per_step_6 = record["per_step_2"], record["per_step_6"]
        assert per_step_6["collectives"] >= per_step_2["collectives"] + 4 * 2  # the two layers, each step
        assert per_step_2["asked"] > 0
        assert torch.equal(per_step_2["ids"], alone[2]) and torch.equal(per_step_6["ids"], alone[6])

        assert torch.equal(record["autocast"]["ids"], bf16) and record["autocast"]["collectives"] == 3
        assert record["autocast_cache_dtype"] == "torch.bfloat16"
        assert record["raised"]
        assert record["sharded_after_rollouts"] and record["sharded_after_exception"] and record["sharded_after_training"]
        if sharding == "fsdp2":
            assert record["settings"] == record["trained_settings"]
        else:
            assert torch.equal(record["fsdp1_mixed_precision"]["ids"], bf16)
            assert record["sharded_after_mixed_precision"]

    model = load_causal_lm(BUILTIN_TINY)
    ids = torch.tensor([prompts[0] * 2])
    model(input_ids=ids, labels=ids).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e9)
    for record in ranks:
        torch.testing.assert_close(record["grad_norm"], norm, rtol=1e-5, atol=0)
