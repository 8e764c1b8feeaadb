"""What the RMT loop needs from torch.distributed beyond Lightning: FSDP2 sharding and gathering Python objects."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard_model(model: nn.Module, device_mesh=None) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to each decoder layer of a Hugging Face model, then to the model itself.

    Decoder layers are the classes the model lists in ``_no_split_modules``. The mesh defaults to one
    dimension over all processes: RMT shards data-parallel only, whatever shape Lightning's
    ``ModelParallelStrategy`` gave its own mesh.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} lists no decoder-layer classes in _no_split_modules "
            f"({sorted(layer_classes)}), so it cannot be sharded layer by layer with FSDP2"
        )
    if device_mesh is None or device_mesh.ndim != 1:
        device_type = next(model.parameters()).device.type
        device_mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=device_mesh)
    fully_shard(model, mesh=device_mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` has FSDP2 (DTensor) parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full, unsharded state dict on CPU (a collective under FSDP2: every rank must call it)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (every rank must call this); ``[obj]`` outside torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
