"""What a corpus costs as it grows: tokenizing, scoring, building the curriculum index, starting warm, and the memory
of a 10-step fit, for corpora of 1M to 1B tokens (tiny model and proxy, CPU).

Text corpora (``--sizes``) are made of random words and go through the whole path: the token store (built with 1
and with 2 tokenizing processes), entropy scoring (``--score-sizes``: 1 process against a bare forward over the
same windows, and 2 processes against 1, every process on one thread, as each GPU of a node is one process),
the index, a warm start and a fit. Above the score sizes the entropy shards are written synthetically (uniform
entropies), since the tiny proxy scores ~0.1M tokens/s per core. ``--synthetic`` sizes (1B) write the token store
and the shards straight in their formats, to measure the index and the training side at that size.

Memory per process: ``anonymous`` is what the process allocated itself (private, not file-backed); ``rss`` adds the
pages of the memory-mapped files it has read, which the kernel drops when it needs them. Each measured stage runs
in a process of its own. Figures go to ``results/scale.json``.

    python benchmarks/scale.py --sizes 1M 10M 100M --score-sizes 1M 10M --synthetic 1B
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import yaml  # noqa: E402

from common import machine, print_table, write_json  # noqa: E402

CONFIG = ROOT / "configs" / "tiny.yaml"
FIT_STEPS = 10
SHARD_TOKENS = 1 << 18
"""Smaller shards than the default (2^20), so that a 1M-token corpus has shards for two processes to share."""


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def data_kwargs(corpus: str, cache: Path, **extra) -> dict:
    """The datamodule's arguments as ``fit --config configs/tiny.yaml --data.corpus ... --data.cache_dir ...`` makes them."""
    config = yaml.safe_load(CONFIG.read_text())
    return {**config["data"], "model_name_or_path": config["model"]["model_name_or_path"], "corpus": corpus,
            "cache_dir": str(cache), "scoring_shard_tokens": SHARD_TOKENS, **extra}


def child_env(threads: int = 1) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def in_child(function: str, *arguments, threads: int = 2) -> dict:
    """Run ``function(*arguments)`` of this file in a fresh process; its JSON result."""
    code = f"import json, scale; print('RESULT ' + json.dumps(scale.{function}(*{list(arguments)!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=child_env(threads), capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"{function} failed:\n{done.stderr[-4000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def _hwm_mb() -> float:
    from memory_probe import memory_mb

    return memory_mb()["hwm_mb"]


# ---------------------------------------------------------------- stages, each in its own process


def tokenize(kwargs: dict) -> dict:
    from rmt_lightning.data.datamodule import RMTDataModule

    datamodule = RMTDataModule(**kwargs)
    started = time.perf_counter()
    store = datamodule._load_documents()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": store.num_tokens, "documents": len(store), "peak_rss_mb": _hwm_mb()}


def score_share(kwargs: dict, rank: int, world_size: int, barrier, results) -> None:
    """Score process ``rank``'s share of the shards (one thread), timed from a barrier shared with the others."""
    import torch

    from rmt_lightning.data.datamodule import RMTDataModule
    from rmt_lightning.data.entropy_shards import ShardScoring, entropy_folder, score_shards

    torch.set_num_threads(1)
    datamodule = RMTDataModule(**kwargs)
    store = datamodule._load_documents()
    key = datamodule.scores_key(store)
    proxy = datamodule._load_proxy()
    hp = datamodule.hparams
    barrier.wait()
    started = time.perf_counter()
    scoring = ShardScoring(hp.scoring_window, hp.scoring_stride, hp.scoring_top_k, hp.scoring_batch_size,
                           datamodule.tokenizer.pad_token_id, hp.scoring_shard_tokens, rank, world_size)
    scored = score_shards(proxy, store, entropy_folder(datamodule.cache_folder, key), key, scoring)
    results.put({"rank": rank, "seconds": time.perf_counter() - started, "shards": scored})


def score(kwargs: dict, world_size: int) -> dict:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(world_size), context.Queue()
    processes = [context.Process(target=score_share, args=(kwargs, rank, world_size, barrier, results)) for rank in range(world_size)]
    for process in processes:
        process.start()
    rows = [results.get(timeout=7200) for _ in processes]
    for process in processes:
        process.join()
    return {"seconds": max(row["seconds"] for row in rows), "shards": sum(row["shards"] for row in rows)}


def bare_forward(kwargs: dict) -> dict:
    """The proxy's no-grad forward over the windows scoring reads (one thread), logits discarded."""
    import torch

    from entropy import bare_forward as forward
    from rmt_lightning.data.datamodule import RMTDataModule

    torch.set_num_threads(1)
    datamodule = RMTDataModule(**kwargs)
    store = datamodule._load_documents()
    proxy = datamodule._load_proxy().eval()
    hp = datamodule.hparams
    started = time.perf_counter()
    forward(proxy, [store[i] for i in range(len(store))], hp.scoring_window, hp.scoring_stride, hp.scoring_batch_size,
            datamodule.tokenizer.pad_token_id)
    return {"seconds": time.perf_counter() - started}


def synthetic_shards(kwargs: dict) -> dict:
    from rmt_lightning.data.datamodule import RMTDataModule
    from synthetic import synthetic_entropy

    datamodule = RMTDataModule(**kwargs)
    store = datamodule._load_documents()
    started = time.perf_counter()
    synthetic_entropy(datamodule, store)
    return {"seconds": time.perf_counter() - started}


def synthetic_tokens(folder: str, tokens: int) -> dict:
    from rmt_lightning.engine.models import load_tokenizer
    from synthetic import synthetic_store

    tokenizer = load_tokenizer(yaml.safe_load(CONFIG.read_text())["model"]["model_name_or_path"])
    started = time.perf_counter()
    store = synthetic_store(Path(folder), tokenizer, tokens)
    return {"seconds": time.perf_counter() - started, "tokens": store.num_tokens, "documents": len(store)}


def index(kwargs: dict) -> dict:
    from rmt_lightning.data.datamodule import RMTDataModule

    datamodule = RMTDataModule(**kwargs)
    started = time.perf_counter()
    datamodule.score_corpus()
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": _hwm_mb(), "candidates": len(datamodule.train_index)}


def warm_start(kwargs: dict) -> dict:
    """``prepare_data`` and ``setup`` with everything built (the tokenizer's loading included; no model)."""
    from memory_probe import memory_mb
    from rmt_lightning.data.datamodule import RMTDataModule

    started = time.perf_counter()
    datamodule = RMTDataModule(**kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    next(iter(datamodule.train_dataloader()))
    return {"seconds": time.perf_counter() - started, **memory_mb()}


def fit_memory(corpus: str, cache: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "rmt_lightning", "fit", "--config", str(CONFIG), "--data.corpus", corpus,
               "--data.cache_dir", str(cache), "--data.scoring_shard_tokens", str(SHARD_TOKENS), "--trainer.max_steps", str(FIT_STEPS), "--data.batches_per_epoch", str(FIT_STEPS),
               "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
               "--trainer.callbacks", "[]", "--trainer.callbacks+=memory_probe.MemoryProbe", f"--trainer.callbacks.path={out}"]
    started = time.perf_counter()
    done = subprocess.run(command, env=child_env(2), cwd=out.parent, capture_output=True, text=True, timeout=7200)
    if done.returncode != 0:
        raise RuntimeError(f"fit failed:\n{done.stderr[-4000:]}")
    return {**json.loads(out.read_text())["peaks"], "seconds": time.perf_counter() - started}


def disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------- driver


def measure(label: str, tokens: int, work: Path, score_it: bool, text: bool) -> dict:
    cache = work / f"cache-{label}"
    row: dict = {"size": label, "tokens_target": tokens, "kind": "text" if text else "synthetic store"}
    if text:
        from rmt_lightning.engine.models import load_tokenizer
        from synthetic import random_text_corpus

        corpus = work / f"corpus-{label}.jsonl"
        if not corpus.exists():
            started = time.perf_counter()
            random_text_corpus(corpus, tokens, load_tokenizer(yaml.safe_load(CONFIG.read_text())["model"]["model_name_or_path"]))
            row["text_seconds"] = time.perf_counter() - started
        one = in_child("tokenize", data_kwargs(str(corpus), work / f"scratch-{label}", tokenize_processes=1))
        shutil.rmtree(work / f"scratch-{label}")
        two = in_child("tokenize", data_kwargs(str(corpus), cache, tokenize_processes=2))
        row.update(tokens=two["tokens"], documents=two["documents"], tokenize_1_tok_s=one["tokens"] / one["seconds"],
                   tokenize_2_tok_s=two["tokens"] / two["seconds"], tokenize_peak_rss_mb=max(one["peak_rss_mb"], two["peak_rss_mb"]))
        corpus = str(corpus)
    else:
        corpus = str(work / f"store-{label}")
        made = in_child("synthetic_tokens", corpus, tokens)
        row.update(tokens=made["tokens"], documents=made["documents"], store_write_seconds=made["seconds"])
    kwargs = data_kwargs(corpus, cache)
    if score_it:
        bare = in_child("bare_forward", kwargs, threads=1)
        one = score(kwargs, 1)
        for folder in cache.glob("entropy-*"):
            shutil.rmtree(folder)
        two = score(kwargs, 2)
        row.update(score_1_tok_s=row["tokens"] / one["seconds"], score_2_tok_s=row["tokens"] / two["seconds"],
                   bare_1_tok_s=row["tokens"] / bare["seconds"], shards=two["shards"])
        row["score_vs_bare"] = row["score_1_tok_s"] / row["bare_1_tok_s"]
        row["two_vs_one"] = row["score_2_tok_s"] / row["score_1_tok_s"]
    else:
        row["synthetic_entropy_seconds"] = in_child("synthetic_shards", kwargs)["seconds"]
    built = in_child("index", kwargs)
    row.update(index_seconds=built["seconds"], index_peak_rss_mb=built["peak_rss_mb"], candidates=built["candidates"])
    warm = in_child("warm_start", kwargs)
    row.update(warm_start_seconds=warm["seconds"], warm_anonymous_mb=warm["anonymous_mb"])
    fit = fit_memory(corpus, cache, work / f"fit-{label}.json")
    row.update(fit_anonymous_mb=fit["anonymous_mb"], fit_rss_mb=fit["rss_mb"], fit_hwm_mb=fit["hwm_mb"])
    store_bytes = disk_bytes(next(cache.glob("tokens-*"))) if text else disk_bytes(Path(corpus))
    entropy_bytes = sum(disk_bytes(f) for f in cache.glob("entropy-*"))
    index_bytes = sum(disk_bytes(f) for f in cache.glob("index-*"))
    row.update(disk_tokens_b_per_token=store_bytes / row["tokens"], disk_entropy_b_per_token=entropy_bytes / row["tokens"],
               disk_index_b_per_token=index_bytes / row["tokens"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["1M", "10M", "100M"], help="text corpora, the whole path")
    parser.add_argument("--score-sizes", nargs="*", default=["1M", "10M"], help="of --sizes, those scored by the proxy")
    parser.add_argument("--synthetic", nargs="*", default=["1B"], help="token stores and shards written straight")
    parser.add_argument("--folder", default="/tmp/rmt-scale", help="work folder (tens of GB at 1B tokens)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--out", default="scale")
    args = parser.parse_args()
    work = Path(args.folder)
    work.mkdir(parents=True, exist_ok=True)
    baseline = fit_memory("embedded:math", work / "cache-64", work / "fit-64.json")
    result = {"machine": machine(), "args": vars(args), "baseline_64_documents": baseline, "rows": []}
    print(f"64-document fit: anonymous {baseline['anonymous_mb']:.0f} MB, rss {baseline['rss_mb']:.0f} MB", flush=True)
    for label, text in [(s, True) for s in args.sizes] + [(s, False) for s in args.synthetic]:
        row = measure(label, parse_size(label), work, text and label in args.score_sizes, text)
        row["fit_anonymous_over_64_documents_mb"] = row["fit_anonymous_mb"] - baseline["anonymous_mb"]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(args.out, result, complete=False)
        for folder in list(work.glob(f"*-{label}")) + list(work.glob(f"*-{label}.*")):
            if not args.keep:
                shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    write_json(args.out, result)

    def value(row, name, digits=2):
        number = row.get(name)
        return "-" if number is None else (f"{number:,.{digits}f}" if isinstance(number, float) else f"{number:,}")

    print_table("corpus scale (tiny model, CPU; memory per process)",
                ["size", "tokens", "tokenize tok/s (1 / 2 proc)", "score tok/s (1 proc)", "score / bare", "2 proc / 1",
                 "index s", "warm start s", "fit anon MB (+ over 64 docs)", "fit RSS MB", "disk B/token (tok+H / index)"],
                [[r["size"], f"{r['tokens']:,}", f"{value(r, 'tokenize_1_tok_s', 0)} / {value(r, 'tokenize_2_tok_s', 0)}",
                  value(r, "score_1_tok_s", 0), value(r, "score_vs_bare"), value(r, "two_vs_one"), value(r, "index_seconds", 1),
                  value(r, "warm_start_seconds"), f"{r['fit_anonymous_mb']:.0f} (+{r['fit_anonymous_over_64_documents_mb']:.0f})",
                  f"{r['fit_rss_mb']:.0f}",
                  f"{r['disk_tokens_b_per_token'] + r['disk_entropy_b_per_token']:.2f} / {r['disk_index_b_per_token']:.2f}"]
                 for r in result["rows"]])


if __name__ == "__main__":
    main()
