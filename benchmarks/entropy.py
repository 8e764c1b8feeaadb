"""Entropy scoring tokens/s: ``score_entropy`` (windowed, ``no_grad``, logits from the hidden states in row chunks,
chunked entropy) against a bare ``no_grad`` forward of the same model over the same windows and batches.

    python benchmarks/entropy.py                  # tiny model + SmolLM2-135M
    python benchmarks/entropy.py --models builtin:smollm2-135m-instruct --documents 16

Documents are the embedded corpus joined and cut to ``--doc_tokens`` tokens, so each spans several windows
(``--window``/``--stride``, the datamodule's defaults). The bare forward runs exactly the windows and batches
``score_entropy`` runs (same plan, same sort, same padding) and returns the full logits; its tokens/s is the
ceiling. Ratio = ours / bare in tokens/s (target >= 0.8). Written to ``results/entropy.json``.
"""

from __future__ import annotations

import argparse

import torch

from common import (add_common_arguments, apply_threads, corpus_token_stream, device, interleaved, print_table,
                    quiet_transformers, write_json)
from rmt_lightning.data.scoring import score_entropy, window_batches, window_plan
from rmt_lightning.engine.models import BUILTIN_SMOLLM2, BUILTIN_TINY, load_causal_lm, load_tokenizer, parse_dtype


@torch.no_grad()
def bare_forward(model, documents, window: int, stride: int, batch_size: int, pad_token_id: int) -> None:
    """The model's forward over the windows ``score_entropy`` scores, batched the same way, logits discarded."""
    dev = next(model.parameters()).device
    for _, ids, mask in window_batches(documents, window, stride, batch_size, pad_token_id):
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[BUILTIN_TINY, BUILTIN_SMOLLM2])
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--doc_tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    add_common_arguments(parser)
    parser.add_argument("--out", default="entropy")
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)
    rows = []
    for name in args.models:
        tokenizer = load_tokenizer(name)
        model = load_causal_lm(name, dtype=parse_dtype(args.dtype)).to(device()).eval()
        stream = corpus_token_stream(tokenizer, args.documents * args.doc_tokens, seed=args.seed)
        documents = [stream[i * args.doc_tokens : (i + 1) * args.doc_tokens] for i in range(args.documents)]
        windows = sum(len(window_plan(len(d), args.window, args.stride)) for d in documents)
        window_tokens = sum(end - start for d in documents for start, end, _ in window_plan(len(d), args.window, args.stride))
        pad = tokenizer.pad_token_id

        def ours():
            score_entropy(model, documents, window=args.window, stride=args.stride, top_k=args.top_k,
                          batch_size=args.batch_size, pad_token_id=pad)

        def bare():
            bare_forward(model, documents, args.window, args.stride, args.batch_size, pad)

        result = interleaved({"ours": ours, "bare": bare}, repeats=args.repeats, warmup=1)
        o, b = result["ours"], result["bare"]
        row = {
            "model": name, "documents": args.documents, "windows": windows, "window_tokens": window_tokens,
            "ours_tok_s": window_tokens / o["wall_median"], "bare_tok_s": window_tokens / b["wall_median"],
            "ours_s": o["wall_median"], "bare_s": b["wall_median"], "ours_runs_s": o["wall"], "bare_runs_s": b["wall"],
            "ours_peak_mb": o["peak_mb"], "bare_peak_mb": b["peak_mb"],
        }
        row["ratio"] = b["wall_median"] / o["wall_median"]
        row["cpu_ratio"] = b["cpu_median"] / o["cpu_median"]
        rows.append(row)
        print(f"  {name}: ratio {row['ratio']:.2f}", flush=True)
        write_json(args.out, {"args": vars(args), "rows": rows}, complete=False)
        del model
    print_table(
        f"entropy scoring tokens/s (window {args.window}, stride {args.stride}, batch {args.batch_size}): "
        "score_entropy vs bare no_grad forward",
        ["model", "windows", "tokens", "ratio (ours/bare)", "CPU-time ratio", "ours tok/s", "bare tok/s",
         "ours peak MB", "bare peak MB"],
        [[r["model"].removeprefix("builtin:"), r["windows"], r["window_tokens"], r["ratio"], r["cpu_ratio"],
          r["ours_tok_s"], r["bare_tok_s"], r["ours_peak_mb"], r["bare_peak_mb"]] for r in rows],
    )
    write_json(args.out, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
