"""The model's weights prepared once per rollout: gathered once under FSDP, cast once to the compute dtype.

A rollout runs the model once per generated token on a few rows, and some work repeats at every one of those
steps although the weights do not change while the rollout runs:

- under ``bf16-mixed`` (``torch.autocast`` over float32 weights, with its weight cache off as Lightning sets it)
  every step casts every weight to bfloat16 again, and the key/value cache is kept in float32;
- under FSDP every step all-gathers every layer's weights, and because each forward is then a collective the
  processes must step together (``generate_group``'s ``all_finished``: one all-reduce per step).

``decoding_weights`` gathers sharded weights once for the rollout (FSDP2: every ``FSDPModule`` unsharded, with
reshard-after-forward off; FSDP1: ``summon_full_params``, decoding through the wrapped modules) and casts the
weights once to the compute dtype (autocast's, or FSDP1's ``mixed_precision.param_dtype``), with autocast off
inside so that activations and the key/value cache are in that dtype too. The model then decodes as the pure
compute-dtype model does: its residual stream is in that dtype, where autocast keeps it in float32 (the
embedding is not autocast), so tokens can differ from the autocast path's where two logits tie within bfloat16
rounding. Everything is restored on leaving, also when the block raises.

Memory while a rollout runs: under FSDP every process holds the whole model's weights (as gathered: FSDP2's
``param_dtype`` when it has one, else full precision), and where the weights are cast, one more copy of all of
them in the compute dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)
_reported: set[str] = set()


def _report_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning(message)


@dataclass(frozen=True)
class DecodingWeights:
    """What ``decoding_weights`` did for the block."""

    gathered: bool
    """Sharded weights were gathered for the block: the model's forwards are no longer collectives, so each
    process may run as many of them as it needs (no agreement between processes)."""
    dtype: torch.dtype | None
    """The dtype the weights were cast to for the block (None: left as they are)."""


def _fsdp_modules(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``model``'s FSDP2 modules and its FSDP1 instances, outermost first."""
    if not torch.distributed.is_available():
        return [], []
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    modules = list(model.modules())
    return ([m for m in modules if isinstance(m, FSDPModule)],
            [m for m in modules if isinstance(m, FullyShardedDataParallel)])


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules of ``modules`` inside none of the others: FSDP's roots, the first of their trees to run forward."""
    inside = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inside]


def _param_groups(state) -> list:
    """An FSDP2 state's parameter groups: ``_fsdp_param_groups`` in recent PyTorch, one ``_fsdp_param_group``
    (or None) in earlier releases."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)


def _fsdp2_can_gather(modules: list[nn.Module]) -> bool:
    """Every parameter group idle (no forward or backward under way) and sharded over an FSDP mesh, the case
    ``set_reshard_after_forward`` covers. Saving and restoring the settings reads FSDP2's internals: a PyTorch
    that renamed them takes the per-step path instead."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, TrainingState
    except ImportError:
        return False
    internals = ("_lazy_init", "_auto_reshard_after_forward")
    for module in modules:
        state = module._get_fsdp_state()
        if not all(hasattr(state, name) for name in internals) or not (
                hasattr(state, "_fsdp_param_groups") or hasattr(state, "_fsdp_param_group")):
            return False
        for group in _param_groups(state):
            if not isinstance(group.mesh_info, FSDPMeshInfo) or group._training_state != TrainingState.IDLE:
                return False
    return True


@contextmanager
def _fsdp2_gathered(modules: list[nn.Module]) -> Iterator[None]:
    """Within the block every FSDP2 module's weights are unsharded, gathered once, and the forwards keep them so.

    The roots are lazily initialised first, as their first forward would do: that initialisation sets a root not
    to reshard after forward only while its setting is still the automatic one, so done inside the block (after
    the setting was changed) it would leave the root resharding after every training forward. The settings are
    then restored exactly (FSDP's own fields: ``set_reshard_after_forward`` cannot say "automatic"), and the
    modules that were sharded before are resharded.
    """
    for root in _outermost(modules):
        root._get_fsdp_state()._lazy_init()
    states = [module._get_fsdp_state() for module in modules]
    settings = [(state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in _param_groups(state)])
                for state in states]
    # A root keeps its weights unsharded after a forward: those stay as they were found.
    were_sharded = [not all(g.is_unsharded for g in _param_groups(state)) for state in states]
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
        for module in modules:
            module.unshard()
        yield
    except BaseException:
        _restore_fsdp2(states, settings)
        # An exception inside a forward leaves FSDP's per-iteration state mid-forward; this is FSDP's recovery.
        for root in _outermost(modules):
            if hasattr(root, "reset_iter_state"):
                root.reset_iter_state()
        _reshard(modules, were_sharded)
        raise
    _restore_fsdp2(states, settings)
    _reshard(modules, were_sharded)


def _restore_fsdp2(states, settings) -> None:
    for state, (auto, mesh_infos) in zip(states, settings):
        state._auto_reshard_after_forward = auto
        for group, mesh_info in zip(_param_groups(state), mesh_infos):
            group.post_forward_mesh_info = mesh_info


def _reshard(modules: list[nn.Module], were_sharded: list[bool]) -> None:
    for module, sharded in zip(modules, were_sharded):
        if sharded:
            module.reshard()


def _fsdp1_can_gather(instances: list[nn.Module]) -> bool:
    """Every FSDP1 instance idle: ``summon_full_params`` refuses to run inside a forward, a backward or another
    summon."""
    from torch.distributed.fsdp._common_utils import TrainingState

    return all(getattr(m, "training_state", None) == TrainingState.IDLE for m in instances)


@contextmanager
def _fsdp1_gathered(model: nn.Module, instances: list[nn.Module]) -> Iterator[None]:
    """Within the block FSDP1's full weights are gathered (``summon_full_params``) and each instance's forward is
    its wrapped module's: FSDP1's own forward asserts it is not inside a summon, and would gather again."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    missing = object()
    with FullyShardedDataParallel.summon_full_params(model, writeback=False, recurse=True):
        previous = [vars(m).get("forward", missing) for m in instances]
        try:
            for m in instances:
                # Through __call__, so the wrapped module's own hooks still run as under FSDP1's forward.
                vars(m)["forward"] = m._fsdp_wrapped_module.__call__
            yield
        finally:
            for m, forward in zip(instances, previous):
                if forward is missing:
                    vars(m).pop("forward", None)
                else:
                    vars(m)["forward"] = forward


def _fsdp1_param_dtype(instances: list[nn.Module]) -> torch.dtype | None:
    """The dtype FSDP1's mixed precision computes in (its root's ``param_dtype``), or None; ``summon_full_params``
    gives full-precision weights whatever it is."""
    config = getattr(instances[0], "mixed_precision", None)
    return getattr(config, "param_dtype", None)


def _is_flat(param: nn.Parameter) -> bool:
    from torch.distributed.fsdp._flat_param import FlatParameter

    return isinstance(param, FlatParameter)


def _lower(dtype: torch.dtype, than: torch.dtype) -> bool:
    return dtype.is_floating_point and than.is_floating_point and torch.finfo(dtype).bits < torch.finfo(than).bits


def _compute_dtype(model: nn.Module, fsdp1_dtype: torch.dtype | None) -> tuple[torch.dtype | None, str]:
    """The dtype the weights are cast to (None: none) and the device type whose autocast decides it."""
    device_type = next(model.parameters()).device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type), device_type
    return fsdp1_dtype, device_type


@contextmanager
def _cast_once(model: nn.Module, dtype: torch.dtype, device_type: str, sharded: bool) -> Iterator[bool]:
    """Within the block each floating parameter wider than ``dtype`` holds a copy cast to ``dtype`` (the parameter
    objects stay; their data is swapped back on leaving) and autocast is off. Yields whether anything was cast."""
    swapped = []
    try:
        for param in model.parameters():
            # FSDP1's flat parameters are what it gathers into, not what the modules compute with.
            if sharded and _is_flat(param):
                continue
            if _lower(dtype, param.dtype):
                original = param.data
                param.data = original.to(dtype)
                swapped.append((param, original))
        if swapped:
            with torch.autocast(device_type, enabled=False):
                yield True
        else:
            yield False
    finally:
        for param, original in reversed(swapped):
            param.data = original


@contextmanager
def decoding_weights(model: nn.Module, gather: bool = True) -> Iterator[DecodingWeights]:
    """Within the block ``model`` runs on weights prepared once for a rollout's forwards (without gradients).

    Under FSDP2 or FSDP1, with ``gather``, the sharded weights are gathered once on entering: every process then
    holds the whole model's weights until the block ends, and the forwards are no longer collectives
    (``DecodingWeights.gathered``). Under autocast with a dtype of lower precision than the weights (or FSDP1
    mixed precision with a lower ``param_dtype``), the weights are cast once to that dtype and autocast is off
    inside, so activations and the key/value cache are in it too: one more copy of the weights, in that dtype,
    while the block runs. Without ``gather``, or where FSDP's state does not allow gathering (a forward or
    backward under way, FSDP1 and FSDP2 mixed in one model, a mesh FSDP does not shard over), the model is left
    as it is: each forward gathers and casts, as outside the block. Everything is restored on leaving, also
    when the block raises.
    """
    fsdp2, fsdp1 = _fsdp_modules(model)
    with ExitStack() as stack:
        gathered, fsdp1_dtype = False, None
        try:
            if gather and fsdp2 and not fsdp1 and _fsdp2_can_gather(fsdp2):
                stack.enter_context(_fsdp2_gathered(fsdp2))
                gathered = True
            elif gather and fsdp1 and not fsdp2 and _fsdp1_can_gather(fsdp1):
                stack.enter_context(_fsdp1_gathered(model, fsdp1))
                gathered, fsdp1_dtype = True, _fsdp1_param_dtype(fsdp1)
        except torch.OutOfMemoryError as error:
            raise torch.OutOfMemoryError(
                f"the whole model's weights do not fit on this device to generate a rollout ({error}); set "
                "model.gather_weights_for_rollouts false to gather them layer by layer at every decoding step"
            ) from error
        if gather and (fsdp1 or fsdp2) and not gathered:
            _report_once("a rollout's FSDP weights cannot be gathered once here (a forward or backward under way, "
                         "FSDP1 and FSDP2 mixed, or FSDP internals this PyTorch names otherwise): each decoding step "
                         "gathers them, and the processes agree at every step")
        cast = None
        if gathered or not (fsdp1 or fsdp2):
            dtype, device_type = _compute_dtype(model, fsdp1_dtype)
            if dtype is not None and stack.enter_context(_cast_once(model, dtype, device_type, gathered)):
                cast = dtype
        yield DecodingWeights(gathered, cast)
