"""What the RMT loop needs from torch.distributed beyond Lightning: sharding a Hugging Face model layer by layer
(FSDP2 ``fully_shard`` or FSDP1 ``FullyShardedDataParallel``), its full state dict, and gathering Python objects."""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of ``model``'s decoder layers: those it lists in ``_no_split_modules``, the unit to shard by."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(model).__name__} lists no decoder-layer classes in _no_split_modules ({sorted(names)}), "
            "so it cannot be sharded layer by layer"
        )
    return classes


def data_parallel_mesh(device_mesh, device_type: str):
    """The one-dimensional mesh over every process that RMT shards on (data-parallel only): Lightning's own
    mesh when it is one-dimensional or its tensor-parallel dimension has size 1, else a new mesh over all
    processes on ``device_type`` (the strategy's root device's type; Lightning's ``ModelParallelStrategy``
    puts a node's devices on the tensor-parallel dimension by default)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_mesh is not None and device_mesh.ndim == 1:
        return device_mesh
    names = (device_mesh.mesh_dim_names or ()) if device_mesh is not None else ()
    if "data_parallel" in names and "tensor_parallel" in names and device_mesh["tensor_parallel"].size() == 1:
        return device_mesh["data_parallel"]
    return init_device_mesh(device_type, (dist.get_world_size(),))


def shard_model(model: nn.Module, device_mesh=None, device_type: str | None = None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer of a Hugging Face model, then to the model itself, on
    ``data_parallel_mesh(device_mesh, device_type)``; the shards go to the mesh's device. ``device_type`` defaults
    to where the parameters are."""
    from torch.distributed.fsdp import fully_shard

    classes = tuple(decoder_layer_classes(model))
    device_mesh = data_parallel_mesh(device_mesh, device_type or next(model.parameters()).device.type)
    for layer in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(layer, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def fsdp1_settings(strategy) -> dict:
    """The ``FullyShardedDataParallel`` arguments a Lightning ``FSDPStrategy`` was configured with, except that
    FSDP leaves buffers in their own dtype.

    Lightning's mixed precision casts buffers to bf16/fp16 at the first forward, the rotary ``inv_freq`` included,
    which Hugging Face models keep in float32 (``models.keep_float32_buffers``); ``buffer_dtype=None`` is FSDP's
    "do not cast". Under ``*-true`` precision the plugin's ``.to(dtype)`` still casts the other buffers.
    """
    import dataclasses

    mixed_precision = strategy.mixed_precision_config
    if mixed_precision is not None:
        mixed_precision = dataclasses.replace(mixed_precision, buffer_dtype=None)
    return dict(cpu_offload=strategy.cpu_offload, mixed_precision=mixed_precision,
                sharding_strategy=strategy.sharding_strategy, **strategy.kwargs)


def wrap_fsdp1(model: nn.Module, device: torch.device, **fsdp_kwargs) -> nn.Module:
    """Wrap a Hugging Face model in FSDP1: each decoder layer a unit, the model the root unit, on ``device``.

    ``fsdp_kwargs`` go to ``FullyShardedDataParallel`` (``fsdp1_settings(strategy)`` gives Lightning's); an
    ``auto_wrap_policy`` among them replaces the decoder-layer one. Wrapping the model itself, rather than
    letting Lightning wrap the whole LightningModule, makes every call of the model a complete FSDP forward:
    embeddings and output head are gathered for each generation step and each loss forward, and several
    forward/backward passes within one training step each gather and reshard correctly. ``device`` is a
    ``torch.device`` (not a bare CUDA index) so that FSDP also accepts a CPU device.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    fsdp_kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(decoder_layer_classes(model)))
    return FullyShardedDataParallel(model, device_id=device, **fsdp_kwargs)


def shard_models(strategy, device_mesh, policy: nn.Module, reference: nn.Module | None):
    """The policy and the frozen reference (or None) as the strategy trains them: under FSDP1 (Lightning's
    ``FSDPStrategy``) each model its own root unit with its decoder layers as units inside it; with a device mesh
    (``ModelParallelStrategy``, FSDP2) each decoder layer sharded, then the rest; otherwise unchanged."""
    if isinstance(strategy, FSDPStrategy):
        settings = fsdp1_settings(strategy)
        policy = wrap_fsdp1(policy, strategy.root_device, **settings)
        if reference is not None:
            reference = wrap_fsdp1(reference, strategy.root_device, **settings)
    elif device_mesh is not None:
        # On the root device's type: the models are still on the CPU here, and are sharded onto the mesh's device.
        mesh = data_parallel_mesh(device_mesh, strategy.root_device.type)
        shard_model(policy, mesh)
        if reference is not None:
            shard_model(reference, mesh)
    return policy, reference


def is_fsdp1(model: nn.Module) -> bool:
    """True when ``model`` is wrapped in FSDP1 ``FullyShardedDataParallel``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` is sharded: FSDP1-wrapped or with FSDP2 (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return is_fsdp1(model) or any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full, unsharded state dict on CPU, under the model's own key names (a collective under FSDP:
    every rank must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Offloading is for accelerators; FSDP1 crashes when asked to offload parameters already on the CPU.
    offload = next(model.parameters()).device.type != "cpu"
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (every rank must call this); ``[obj]`` outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def world_size(trainer) -> int:
    """Processes of the run (1 without a trainer)."""
    return trainer.world_size if trainer is not None else 1


def all_ranks(trainer, flag: bool) -> bool:
    """True when ``flag`` holds on every rank (every rank must call this)."""
    if world_size(trainer) == 1:
        return flag
    value = torch.tensor(float(flag), device=trainer.strategy.root_device)
    return bool(trainer.strategy.reduce(value, reduce_op="min") > 0)


def agreement(trainer):
    """``all_ranks`` for ``trainer``'s processes when there are several (every forward is a collective under FSDP,
    so they must all take the same path), else None: what ``prefill``, ``completion_logprobs`` and
    ``generate_group`` take as ``all_agree`` / ``all_finished``."""
    return (lambda flag: all_ranks(trainer, flag)) if world_size(trainer) > 1 else None


def max_over_ranks(trainer, count: int) -> int:
    """The largest ``count`` of any rank, so that every rank runs as many forward/backward passes."""
    if world_size(trainer) == 1:
        return count
    value = torch.tensor(float(count), device=trainer.strategy.root_device)
    return int(trainer.strategy.reduce(value, reduce_op="max"))


def gradients_finite(model) -> bool:
    """Whether every gradient of ``model`` on this rank is finite (its local shard under FSDP)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
