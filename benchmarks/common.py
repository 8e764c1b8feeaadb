"""Shared pieces of the benchmarks: machine description, timers, peak memory, seeded prompts, tables, JSON.

Every benchmark compares two implementations in the same process on the same inputs and reports the ratio.
Timings are taken *interleaved* (A, B, A, B, ...) and summarised by the median, so a slow drift in the load
of a shared machine affects both sides alike; the process CPU time is reported beside the wall time because
it is less sensitive to other processes competing for the cores.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("RMT_BENCH_OUT", Path(__file__).resolve().parent / "results"))


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as handle:
            found = re.search(r"model name\s*:\s*(.+)", handle.read())
            cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- memory


def _read_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            found = re.search(r"VmHWM:\s+(\d+)\s+kB", handle.read())
        return int(found.group(1)) / 1024 if found else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak resident set size (VmHWM) of the process.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: RSS of the process on CPU (VmHWM reset at entry), ``max_memory_allocated`` on GPU.

    ``mb`` is the peak in MiB after the block; None where the platform offers neither measure.
    """

    def __init__(self):
        self.mb: float | None = None
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "rss"

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._reset = _reset_hwm()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mb = _read_hwm_mb() if self._reset else None
        return False


# ---------------------------------------------------------------- time


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def stopwatch(record: dict):
    """Wall and process CPU seconds of the block, written to ``record["wall"]`` and ``record["cpu"]``."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    yield record
    sync()
    record["wall"] = time.perf_counter() - wall
    record["cpu"] = time.process_time() - cpu


def interleaved(runs: dict[str, Callable[[], dict | None]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Call each function of ``runs`` in turn, ``warmup`` untimed rounds then ``repeats`` timed rounds.

    Returns per name: ``wall`` and ``cpu`` lists, their medians, the peak memory over the timed rounds, and
    whatever dict the function returned last (e.g. how many tokens it produced).
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    out = {name: {"wall": [], "cpu": [], "peak_mb": None, "extra": {}} for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            record: dict = {}
            with PeakMemory() as memory, stopwatch(record):
                extra = fn()
            out[name]["wall"].append(record["wall"])
            out[name]["cpu"].append(record["cpu"])
            if memory.mb is not None:
                out[name]["peak_mb"] = max(out[name]["peak_mb"] or 0.0, memory.mb)
            out[name]["extra"] = extra or {}
    for result in out.values():
        result["wall_median"] = statistics.median(result["wall"])
        result["cpu_median"] = statistics.median(result["cpu"])
        result["wall_spread"] = (max(result["wall"]) - min(result["wall"])) / result["wall_median"]
    return out


# ---------------------------------------------------------------- inputs


def corpus_token_stream(tokenizer, min_tokens: int, seed: int = 0) -> list[int]:
    """Token ids of the embedded math corpus (documents joined by blank lines), at least ``min_tokens`` long."""
    from rmt_lightning.data.mathgen import generate_math_corpus

    ids: list[int] = []
    count = 64
    while len(ids) < min_tokens:
        text = "\n\n".join(generate_math_corpus(count, seed=seed))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        count *= 2
    return ids


def corpus_prompts(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens each, cut from different places of the corpus."""
    stream = corpus_token_stream(tokenizer, count * length + 1, seed=seed)
    return [stream[i * length : (i + 1) * length] for i in range(count)]


def rmt_contexts(tokenizer, count: int, context_tokens: int, seed: int = 0) -> tuple[list[list[int]], list[list[bytes]]]:
    """``count`` (context, continuation bytes) pairs from the embedded corpus, as the datamodule builds them:
    the ``context_tokens`` tokens before a position and the bytes of the 8 tokens from it."""
    from rmt_lightning.engine.tokens import TokenBytes

    stream = corpus_token_stream(tokenizer, (count + 1) * (context_tokens + 8) + 1, seed=seed)
    token_bytes = TokenBytes(tokenizer)
    contexts, continuations = [], []
    for i in range(count):
        start = i * (context_tokens + 8)
        contexts.append(stream[start : start + context_tokens])
        continuations.append(token_bytes.many(stream[start + context_tokens : start + context_tokens + 8]))
    return contexts, continuations


# ---------------------------------------------------------------- output


def budget_row_path(row: str) -> str:
    """The suffix naming a budget-step row's path (", copied cache", ", unpacked"; "" for the default): each row is
    compared with the RPT row of its own path."""
    return next((suffix for suffix in (", copied cache", ", unpacked") if row.endswith(suffix)), "")


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, columns: list[str], rows: list[list]) -> str:
    """Print a markdown table and return it."""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    print(flush=True)
    return text


def write_json(name: str, payload: dict, complete: bool = True) -> Path:
    """Write ``results/<name>.json`` (or under ``$RMT_BENCH_OUT``) with the machine description added.

    A benchmark rewrites its file with ``complete=False`` after each row, so a run stopped by a time limit leaves
    the rows it finished; the file is replaced whole, never left half written.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    written = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    payload = {"benchmark": name, "written": written, "complete": complete, "machine": machine(), "argv": sys.argv,
               **payload}
    payload["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(partial, path)
    if complete:
        print(f"wrote {path}", flush=True)
    return path


def add_common_arguments(parser) -> None:
    """``--threads`` and ``--seed``, shared by every benchmark."""
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default 1: on a shared machine, OpenMP threads waiting at barriers for a core "
             "another process holds make small ops 10-100x slower and timings erratic; 0 keeps torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0)


def apply_threads(threads: int) -> None:
    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def quiet_transformers() -> None:
    """Silence the weight-loading progress bars, which would drown the tables."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
