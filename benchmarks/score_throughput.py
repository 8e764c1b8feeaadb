"""Entropy scoring tokens/s through ``python -m rmt_lightning score``'s own entry (``RMTTrainer.score``: the
datamodule's sharded pass, each shard written by a background thread while the next is scored) against a bare
no-grad forward of the same proxy over the same windows, on this machine's first device (bfloat16 on a GPU, as
``data.scoring_dtype auto`` chooses). The corpus is random words of ``--tokens`` tokens, tokenized before the
clock starts. ``gpu_check.sh`` runs it on the GPU machine.

    python benchmarks/score_throughput.py --models builtin:tiny-llama --tokens 500000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import add_common_arguments, apply_threads, device, machine, print_table, quiet_transformers, sync, write_json
from entropy import bare_forward
from synthetic import random_text_corpus


def measure(name: str, tokens: int, shard_tokens: int, dtype: str, work: Path) -> dict:
    from rmt_lightning.cli import RMTTrainer
    from rmt_lightning.data.datamodule import RMTDataModule
    from rmt_lightning.engine.models import load_tokenizer

    tokenizer = load_tokenizer(name)
    corpus = random_text_corpus(work / "corpus.jsonl", tokens, tokenizer)
    datamodule = RMTDataModule(corpus=str(corpus), model_name_or_path=name, cache_dir=str(work / "cache"), val_documents=4,
                               scoring_dtype=dtype, scoring_shard_tokens=shard_tokens)
    trainer = RMTTrainer(accelerator="auto", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False)
    datamodule.prepare_data()  # the token store, before the clock
    trainer.score(datamodule=datamodule)
    [scored] = datamodule.scoring_passes
    store = datamodule.train_index.store
    proxy = datamodule._load_proxy().eval()
    hp = datamodule.hparams
    documents = [store[i] for i in range(len(store))]
    bare_forward(proxy, documents[:8], hp.scoring_window, hp.scoring_stride, hp.scoring_batch_size, tokenizer.pad_token_id)
    sync()
    started = time.perf_counter()
    bare_forward(proxy, documents, hp.scoring_window, hp.scoring_stride, hp.scoring_batch_size, tokenizer.pad_token_id)
    sync()
    bare_seconds = time.perf_counter() - started
    row = {"model": name, "tokens": scored["tokens"], "shards": len(list((work / "cache").glob("entropy-*/shard-*"))),
           "dtype": datamodule.scoring_dtype, "device": str(datamodule._scoring_device()),
           "score_s": scored["seconds"], "bare_s": bare_seconds}
    row["score_tok_s"], row["bare_tok_s"] = row["tokens"] / row["score_s"], row["tokens"] / row["bare_s"]
    row["ratio"] = row["score_tok_s"] / row["bare_tok_s"]
    del proxy
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["builtin:tiny-llama"])
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--shard_tokens", type=int, default=1 << 18)
    parser.add_argument("--dtype", default="auto", help="the proxy's precision (auto: bfloat16 on a GPU)")
    add_common_arguments(parser)
    parser.add_argument("--out", default="score_throughput")
    args = parser.parse_args()
    quiet_transformers()
    apply_threads(args.threads)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as work:
            rows.append(measure(name, args.tokens, args.shard_tokens, args.dtype, Path(work)))
        print(f"  {name}: score / bare {rows[-1]['ratio']:.2f}", flush=True)
        write_json(args.out, {"machine": machine(), "device": str(device()), "args": vars(args), "rows": rows}, complete=False)
    print_table("entropy scoring through `score` (shards written while the next is scored) vs a bare no_grad forward",
                ["model", "device", "dtype", "tokens", "shards", "score tok/s", "bare tok/s", "score / bare"],
                [[r["model"], r["device"], r["dtype"], r["tokens"], r["shards"], r["score_tok_s"], r["bare_tok_s"], r["ratio"]]
                 for r in rows])
    write_json(args.out, {"machine": machine(), "device": str(device()), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
