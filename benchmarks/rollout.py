"""Rollout tokens/s: ``generate_group`` (prefill once per prompt; its keys and values stored once for its G rows
and read by shared-prompt attention) against ``model.generate(num_return_sequences=G)`` (the prompt repeated G
times before the prefill) and against ``generate_group`` without shared-prompt attention (the cache copied to each row: the
path before shared-prompt attention), same model, prompts, seeds and sampling settings, in one process. Ours decodes
with the linear weights packed once per rollout for oneDNN on a CPU (``engine/prepacked.py``); ``unpacked`` is ours
without that (the path before it), and ``generate packed`` is ``generate`` under the same packing (prefill
included), to tell what the shared prompt gains from what the packing gains.

    python benchmarks/rollout.py                       # tiny model sweep + SmolLM2-135M headline
    python benchmarks/rollout.py --models builtin:tiny-llama --contexts 256 --caps 32
    python benchmarks/rollout.py --dtype bfloat16 --sides ours copied generate   # on a GPU, where nothing is packed

Both sides decode exactly ``cap`` new tokens per row: the end-of-sequence token is suppressed in both
(``min_new_tokens`` for ``generate``; a wrapper that masks its logit for ``generate_group``, whose small cost
counts against it), so tokens/s compares the same work. Prompts are ``context`` tokens cut from the embedded
corpus. Timings are interleaved and the median is reported; the ratio is ours / generate in tokens/s
(higher is better for us). Cache MB is the key/value storage each side holds at its last decoding step
(every tensor the cache's layers reference, counted once). Written to ``results/rollout.json``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from common import add_common_arguments, apply_threads, device, interleaved, print_table, quiet_transformers, write_json, corpus_prompts
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, BUILTIN_TINY, load_causal_lm, load_tokenizer, parse_dtype
from rmt_lightning.engine.prepacked import prepacked_linears
from rmt_lightning.engine.generation import DecodingOptions, GenerationSettings, end_of_sequence_ids, generate_group


def cache_megabytes(cache) -> float:
    """Storage of every tensor the cache's layers reference (nested layers too), each storage counted once."""
    seen: dict[int, int] = {}

    def walk(obj, depth=0):
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
            elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, nn.Module):
                walk(value, depth + 1)

    for layer in getattr(cache, "layers", []):
        walk(layer)
    return sum(seen.values()) / 2**20


class CacheMeter:
    """Records the size of the key/value cache the model is given at its latest forward."""

    def __init__(self, model: nn.Module):
        self.megabytes = 0.0
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and args == () and kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            self.megabytes = cache_megabytes(cache)


class SuppressEnd(nn.Module):
    """The model with its end-of-sequence logits at -inf, so every row decodes to the cap (what
    ``min_new_tokens`` does for ``generate``)."""

    def __init__(self, lm: nn.Module, eos_ids: set[int]):
        super().__init__()
        self.lm = lm
        self.eos = torch.tensor(sorted(eos_ids))

    @property
    def generation_config(self):
        return self.lm.generation_config

    def forward(self, *args, **kwargs):
        out = self.lm(*args, **kwargs)
        out.logits[..., self.eos.to(out.logits.device)] = float("-inf")
        return out


SIDES = ("ours", "unpacked", "copied", "generate", "generate_packed")
"""What a row times; ``unpacked`` and ``generate_packed`` equal ``ours`` and ``generate`` wherever nothing is packed
(a GPU, half precision), so a GPU run leaves them out with ``--sides``."""


def bench_model(name: str, contexts: list[int], caps: list[int], group_size: int, prompts_per_batch: int,
                repeats: int, dtype: str, seed: int, sides: tuple[str, ...] = SIDES, on_row=None) -> list[dict]:
    """Rows of ``name`` for every context and cap; ``on_row(row)`` is called as each row is finished."""
    tokenizer = load_tokenizer(name)
    model = load_causal_lm(name, dtype=parse_dtype(dtype)).to(device()).eval()
    eos_ids = end_of_sequence_ids(model, tokenizer)
    ours_model = SuppressEnd(model, eos_ids)
    meter = CacheMeter(model)
    rows = []
    for context in contexts:
        prompts = corpus_prompts(tokenizer, prompts_per_batch, context, seed=seed)
        ids = torch.tensor(prompts, device=device())
        mask = torch.ones_like(ids)
        for cap in caps:
            def ours(share_prompt=True, prepack=True):
                rollout = generate_group(ours_model, tokenizer, prompts, GenerationSettings(group_size, cap, 0, temperature=1.0),
                                         DecodingOptions(share_prompt_attention=share_prompt, prepack_weights=prepack),
                                         generator=torch.Generator(device()).manual_seed(seed))
                return {"tokens": int(rollout.completion_mask.sum()), "cache_mb": meter.megabytes}

            def copied():
                return ours(share_prompt=False)

            def unpacked():
                return ours(prepack=False)

            def hf(packed=False):
                torch.manual_seed(seed)
                with torch.no_grad(), prepacked_linears(model, ids.shape[0] * group_size, enabled=packed):
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                         top_k=0, max_new_tokens=cap, min_new_tokens=cap, num_return_sequences=group_size,
                                         pad_token_id=tokenizer.pad_token_id)
                return {"tokens": int(out[:, ids.shape[1]:].numel()), "cache_mb": meter.megabytes}

            def hf_packed():
                return hf(packed=True)

            # Warm up each side on a short run (first-call costs: allocator, kernels, caches), then time the
            # real size interleaved.
            generate_group(ours_model, tokenizer, prompts, GenerationSettings(group_size, 2, 0, temperature=1.0),
                           generator=torch.Generator(device()).manual_seed(seed))
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=2, min_new_tokens=2,
                               num_return_sequences=group_size, pad_token_id=tokenizer.pad_token_id)
            runs = {"ours": ours, "unpacked": unpacked, "copied": copied, "generate": hf, "generate_packed": hf_packed}
            result = interleaved({side: runs[side] for side in sides}, repeats=repeats, warmup=0)
            row = {"model": name, "context": context, "cap": cap, "G": group_size, "prompts": prompts_per_batch}
            # A side left out leaves its keys out (summary.py tells a row's paths by which keys it has).
            o, h = result["ours"], result["generate"]
            row.update({"ours_tokens": o["extra"]["tokens"], "generate_tokens": h["extra"]["tokens"]})
            for side, r in result.items():
                row[f"{side}_s"] = r["wall_median"]
                row[f"{side}_tok_s"] = r["extra"]["tokens"] / r["wall_median"]
                row[f"{side}_runs_s"] = r["wall"]
            for side in ("ours", "generate", "copied"):
                if side in result:
                    row[f"{side}_peak_mb"] = result[side]["peak_mb"]
                    row[f"{side}_cache_mb"] = result[side]["extra"]["cache_mb"]
            row["ours_cpu_s"], row["generate_cpu_s"] = o["cpu_median"], h["cpu_median"]
            row["ratio"] = row["ours_tok_s"] / row["generate_tok_s"]
            for side in ("copied", "unpacked"):
                if side in result:
                    row[f"{side}_ratio"] = row[f"{side}_tok_s"] / row["generate_tok_s"]
            if "generate_packed" in result:
                row["ratio_vs_generate_packed"] = row["ours_tok_s"] / row["generate_packed_tok_s"]
            row["cache_ratio"] = row["ours_cache_mb"] / row["generate_cache_mb"]
            row["cpu_ratio"] = (o["extra"]["tokens"] / o["cpu_median"]) / (h["extra"]["tokens"] / h["cpu_median"])
            rows.append(row)
            others = ", ".join(f"{label} {row[key]:.2f}" for label, key in (
                ("copied", "copied_ratio"), ("unpacked", "unpacked_ratio"),
                ("against generate packed", "ratio_vs_generate_packed")) if key in row)
            caches = " / ".join(f"{row[f'{side}_cache_mb']:.1f}" for side in ("ours", "copied", "generate")
                                if f"{side}_cache_mb" in row)
            print(f"  {name} context {context} cap {cap}: ours {row['ours_tok_s']:.1f} tok/s, generate "
                  f"{row['generate_tok_s']:.1f} tok/s, ratio {row['ratio']:.2f} ({others}); cache MB {caches}", flush=True)
            if on_row is not None:
                on_row(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BUILTIN_TINY, BUILTIN_SMOLLM2])
    parser.add_argument("--contexts", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--caps", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--group_size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=1, help="prompts per batch (each gets G rows)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                        help="what to time (ours and generate always; on a GPU: ours copied generate)")
    add_common_arguments(parser)
    parser.add_argument("--out", default="rollout")
    args = parser.parse_args()
    if not {"ours", "generate"} <= set(args.sides):
        parser.error(f"--sides must include ours and generate, whose ratio each row reports; got {args.sides}")
    sides = tuple(side for side in SIDES if side in args.sides)
    quiet_transformers()
    apply_threads(args.threads)
    rows = []

    def save(row):
        rows.append(row)
        write_json(args.out, {"args": vars(args), "rows": rows}, complete=False)

    for name in args.models:
        bench_model(name, args.contexts, args.caps, args.group_size, args.prompts, args.repeats, args.dtype, args.seed,
                    sides, on_row=save)
    print_table(
        f"rollout tokens/s, G={args.group_size}, {args.prompts} prompt(s) per batch: generate_group vs generate(num_return_sequences)",
        ["model", "context", "cap", "ratio (ours/generate)", "copied cache / generate", "unpacked / generate",
         "ours / generate packed", "CPU-time ratio", "ours tok/s", "copied tok/s", "generate tok/s", "cache MB ours",
         "cache MB copied", "cache MB generate", "ours peak MB",
         "generate peak MB"],
        [[r["model"].removeprefix("builtin:"), r["context"], r["cap"], r["ratio"], r.get("copied_ratio"),
          r.get("unpacked_ratio"), r.get("ratio_vs_generate_packed"), r["cpu_ratio"],
          r["ours_tok_s"], r.get("copied_tok_s"), r["generate_tok_s"], r["ours_cache_mb"], r.get("copied_cache_mb"),
          r["generate_cache_mb"], r["ours_peak_mb"], r["generate_peak_mb"]] for r in rows],
    )
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
