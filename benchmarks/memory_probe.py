"""A callback that records a training process's memory (``/proc/self/smaps_rollup``) after setup and after every
step, and writes the peaks to a JSON file when fit ends: ``anonymous_mb`` (private, not file-backed: what the
process itself allocated) and ``rss_mb`` (with the pages of memory-mapped files it has read, which the kernel can
drop at any time), and ``hwm_mb`` (the kernel's peak resident set). Used by ``scale.py`` and the memory test:
``--trainer.callbacks+=memory_probe.MemoryProbe --trainer.callbacks.path=<file>`` with this folder on PYTHONPATH."""

from __future__ import annotations

import json
import re

import lightning as L


def memory_mb() -> dict[str, float]:
    """This process's ``Rss`` and ``Anonymous`` memory now and its peak resident set ``VmHWM``, in MiB."""
    with open("/proc/self/smaps_rollup") as handle:
        rollup = handle.read()
    with open("/proc/self/status") as handle:
        status = handle.read()

    def field(text: str, name: str) -> float:
        found = re.search(rf"^{name}:\s+(\d+) kB", text, re.MULTILINE)
        return int(found.group(1)) / 1024 if found else float("nan")

    return {"rss_mb": field(rollup, "Rss"), "anonymous_mb": field(rollup, "Anonymous"), "hwm_mb": field(status, "VmHWM")}


class MemoryProbe(L.Callback):
    """Peaks of ``memory_mb()`` over setup and the training steps, written to ``path`` at the end of fit."""

    def __init__(self, path: str):
        self.path = path
        self.samples: list[dict[str, float]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.samples.append({"at": "setup", **memory_mb()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples.append({"at": f"step {trainer.global_step}", **memory_mb()})

    def on_fit_end(self, trainer, pl_module) -> None:
        peaks = {name: max(s[name] for s in self.samples) for name in ("rss_mb", "anonymous_mb", "hwm_mb")}
        with open(self.path, "w") as handle:
            json.dump({"peaks": peaks, "samples": self.samples, "rank": trainer.global_rank}, handle, indent=1)
