"""Load causal LMs and tokenizers by hub id, local folder or built-in name (``builtin_models.py``), through
``transformers``' Auto classes, and check a model source before anything is loaded."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from ..runtime.errors import InputError, names_a_local_path
from .builtin_models import BUILTIN_MODELS, BUILTIN_SMOLLM2, BUILTIN_TINY, build_builtin_tiny, convert_builtin_smollm2

log = logging.getLogger(__name__)

def resolve_model_source(name_or_path: str) -> str:
    """Map the built-in source name to its converted folder; hub ids and local folders pass through."""
    if name_or_path == BUILTIN_SMOLLM2:
        return str(convert_builtin_smollm2())
    if name_or_path == BUILTIN_TINY:
        return str(build_builtin_tiny())
    if name_or_path.startswith("builtin:"):
        raise ValueError(f"unknown built-in model '{name_or_path}'; valid: {[BUILTIN_SMOLLM2, BUILTIN_TINY]}")
    return name_or_path


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (the EOS token when it has none) and left padding for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of '{name_or_path}' has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A ``transformers`` causal LM in ``dtype`` as ``from_pretrained`` returns it (in eval mode; the caller
    sets the mode it needs), whose float32 buffers stay float32 under later casts (``keep_float32_buffers``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_source(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code
    )
    keep_float32_buffers(model)
    return model


_FLOAT32_BUFFERS = "_float32_buffers"
"""Attribute of a submodule: the names of its own buffers that ``.to(dtype)`` leaves in float32."""


def half_precision_float32_buffers(model: nn.Module) -> set[str]:
    """Names of the floating non-persistent buffers that ``model``'s class keeps in float32 when
    ``from_pretrained`` builds it in bfloat16 (rotary ``inv_freq``, ``original_inv_freq``).

    Read off a bfloat16 copy built on the meta device (no memory, no weights), because a model loaded in float32
    holds every floating buffer in float32, also those a bfloat16 load casts and its forward then expects in the
    weights' dtype. Should the copy not build, the model's own float32 non-persistent buffers stand in.
    """
    import copy

    try:
        with torch.device("meta"):
            # A copy of the config: _from_config writes the dtype into the config it is given.
            skeleton = type(model)._from_config(copy.deepcopy(model.config), dtype=torch.bfloat16)
    except Exception as error:  # remote code need not build on the meta device
        log.debug("no meta-device copy of %s (%s): its own float32 buffers are kept", type(model).__name__, error)
        skeleton = model
    return {
        f"{owner}.{name}" if owner else name
        for owner, module in skeleton.named_modules()
        for name, buffer in module._buffers.items()
        if buffer is not None and buffer.dtype == torch.float32 and name in module._non_persistent_buffers_set
    }


def keep_float32_buffers(model: nn.Module, names: set[str] | None = None) -> None:
    """Make ``.to(dtype)``, ``.bfloat16()``, ``.half()`` on ``model`` or any module holding it leave the buffers
    ``names`` (default: ``half_precision_float32_buffers(model)``) in float32; device moves still apply.

    A bfloat16 rotary ``inv_freq`` puts angles off by about 0.18 rad at position 1000, and Lightning's
    ``bf16-true`` / ``16-true`` cast the whole LightningModule. The buffers' owners get an instance ``_apply``
    that undoes a change of their dtype, so it holds wherever the cast comes from (precision plugins under every
    strategy, ``reference_dtype``, user code), survives ``copy.deepcopy`` and FSDP wrapping, and leaves state
    dicts unchanged. FSDP1's own buffer cast is turned off in ``distributed.fsdp1_settings``.
    """
    names = half_precision_float32_buffers(model) if names is None else names
    owners: dict[str, set[str]] = {}
    for full_name in names:
        owner, _, name = full_name.rpartition(".")
        owners.setdefault(owner, set()).add(name)
    for owner, kept in owners.items():
        module = model.get_submodule(owner)
        setattr(module, _FLOAT32_BUFFERS, frozenset(kept) | getattr(module, _FLOAT32_BUFFERS, frozenset()))
        # A partial of a module-level function, not a bound method: it pickles and deep-copies with the module.
        module._apply = functools.partial(_apply_keeping_float32, module)


def _apply_keeping_float32(module: nn.Module, fn, recurse: bool = True):
    """``nn.Module._apply`` that gives the module's kept buffers back their dtype (on their new device)."""
    kept = getattr(module, _FLOAT32_BUFFERS)
    before = {name: module._buffers[name] for name in kept if module._buffers.get(name) is not None}
    result = type(module)._apply(module, fn, recurse)
    for name, buffer in before.items():
        after = module._buffers.get(name)
        if after is not None and after.dtype != buffer.dtype:
            module._buffers[name] = buffer.to(device=after.device)
    return result


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The weight precisions a model can be loaded in, by name."""


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so it works under FSDP too)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def parse_dtype(name: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` to a torch dtype, with one clear error otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype '{name}' is not supported; valid: {sorted(DTYPES)}")
    return DTYPES[name]


_MAX_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""Config fields that give the longest sequence a model supports, in the order they are read."""


def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The ``transformers`` config of a model source (reads config.json only, loads no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_source(name_or_path), trust_remote_code=trust_remote_code)


def max_positions(config) -> int | None:
    """Longest sequence a model's config says it supports (None when the config does not say)."""
    for field in _MAX_POSITION_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_source(name: str, field: str = "model_name_or_path") -> None:
    """A model source that can be loaded: a built-in name, an existing Hugging Face folder, or a hub id that is
    in the local cache or reachable. Converts nothing and downloads no weights."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise InputError(f"{field} '{name}' is not a built-in model; valid: {list(BUILTIN_MODELS)}")
        return
    path = Path(name).expanduser()
    if names_a_local_path(name):
        if not path.exists():
            raise InputError(f"{field} '{name}' does not exist; give a Hugging Face model folder, a hub id or one of {list(BUILTIN_MODELS)}")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise InputError(f"{field} '{name}' is not a Hugging Face model folder (no config.json in it)")
        return
    _check_hub_model(name, field)


def _check_hub_model(repo_id: str, field: str) -> None:
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except HFValidationError as error:
        raise InputError(f"{field} '{repo_id}' is neither an existing folder nor a valid hub id ({error})") from None
    valid = f"give a local model folder or one of {list(BUILTIN_MODELS)}"
    if constants.HF_HUB_OFFLINE:
        raise InputError(
            f"{field} '{repo_id}' is a hub id, the hub is offline (HF_HUB_OFFLINE) and it is not in the "
            f"Hugging Face cache ({constants.HF_HUB_CACHE}); {valid}"
        )
    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError) as error:
        raise InputError(f"{field} '{repo_id}' is not an accessible model on the hub ({type(error).__name__}); {valid}") from None
    except Exception as error:
        raise InputError(
            f"{field} '{repo_id}' is a hub id, it is not in the Hugging Face cache and the hub cannot be reached "
            f"({type(error).__name__}: {error}); {valid}"
        ) from None


def check_fits_model(lengths: dict[str, int], model: str, limit: int | None) -> None:
    """Every named length (``{"max_context_tokens": 256, ...}``) fits ``limit`` positions of ``model``."""
    if limit is None:
        return
    for name, length in lengths.items():
        if length > limit:
            raise InputError(
                f"{name}={length} is longer than model '{model}' supports ({limit} positions); valid: at most {limit}"
            )
