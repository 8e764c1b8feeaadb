"""What the processes share while they score a corpus's entropy shards: a stop on a preemption signal that every
process takes at the same round, and one progress bar (on rank 0) counting every process's tokens.

A scheduler preempts with SIGTERM (or SLURM's ``--signal``, often SIGUSR1) and kills after a grace period. A signal
during scoring only marks the process; between two rounds of shards the processes agree (the largest signal any
of them received), so all of them stop together, keep every finished shard and raise ``ScoringStopped``: the
command line prints one line and exits with 128 + the signal's number, and the same command continues from the
finished shards.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import Tensor

SCORING_STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
"""Signals that stop a scoring pass after the shards in flight (what schedulers send before they kill)."""


class ScoringStopped(Exception):
    """Entropy scoring stopped on a signal, keeping the finished shards; ``exit_status`` is 128 + its number."""

    def __init__(self, signum: int, folder: str, finished: int, total: int, global_rank: int):
        self.signum, self.global_rank = signum, global_rank
        self.exit_status = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} received: entropy scoring stopped with {finished} of {total} shards "
            f"finished in {folder}; the same command continues from them"
        )


class ScoringPass:
    """Stop flag and progress of one scoring pass, shared by the processes (use as a context manager around
    ``entropy_shards.score_shards``, passing ``stop`` and ``progress``).

    Args:
        tokens: Tokens of the whole corpus (the bar's total).
        reduce: ``reduce(tensor, op)`` across the processes (``op``: ``"sum"`` or ``"max"``); None for one process.
        show: Whether this process draws the bar (rank 0).
        description: The bar's label.
    """

    def __init__(self, tokens: int, reduce: Callable[[Tensor, str], Tensor] | None = None, show: bool = True,
                 description: str = "entropy"):
        self.tokens, self.reduce, self.show, self.description = int(tokens), reduce, show, description
        self.received: int | None = None
        """The first stop signal this process received (None: none)."""
        self.agreed: int = 0
        """The signal the processes agreed to stop on (0: none)."""
        self.scored_tokens = 0
        """Tokens the processes scored in this pass (all of them together)."""
        self.resumed_tokens = 0
        """Tokens of shards an earlier pass had finished."""
        self.seconds = 0.0
        """How long the pass took, from entering to leaving the block."""
        self.loading_seconds = 0.0
        """Of ``seconds``, how long loading the proxy took (``timed_loading``)."""
        self._pending = 0
        self._rounds = 0
        self._previous: dict[int, object] = {}
        self._bar = None

    def __enter__(self) -> ScoringPass:
        self._started = time.perf_counter()
        if threading.current_thread() is threading.main_thread():
            for name in SCORING_STOP_SIGNALS:
                number = signal.Signals[name]
                self._previous[number] = signal.signal(number, self._mark)
        if self.show:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.tokens, desc=self.description, unit="tok", unit_scale=True, file=sys.stderr,
                             dynamic_ncols=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self._started
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        if self._bar is not None:
            self._bar.close()

    def timed_loading(self, load: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
        """``load``, counting the time it takes in ``loading_seconds`` (not scoring time)."""

        def timed() -> torch.nn.Module:
            started = time.perf_counter()
            try:
                return load()
            finally:
                self.loading_seconds += time.perf_counter() - started

        return timed

    @property
    def scoring_seconds(self) -> float:
        """Seconds spent scoring: the pass less the proxy's loading."""
        return self.seconds - self.loading_seconds

    def _mark(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def progress(self, tokens: int) -> None:
        """Tokens this process has scored (or found scored by an earlier pass) since the last call."""
        self._pending += int(tokens)

    def stop(self) -> bool:
        """Whether any process received a stop signal; every process must call it at the same round (it is a
        collective with several processes). Also moves the bar by every process's tokens since the last call."""
        mark = torch.tensor([float(self.received or 0)], dtype=torch.float64)
        tokens = torch.tensor([float(self._pending)], dtype=torch.float64)
        if self.reduce is not None:
            mark, tokens = self.reduce(mark, "max"), self.reduce(tokens, "sum")
        self._pending = 0
        count = int(tokens.item())
        if not self._rounds:
            # The first round reports the shards earlier passes finished: counted, but not in the rate.
            self.resumed_tokens = count
            if self._bar is not None:
                self._bar.initial = self._bar.n = self._bar.last_print_n = count
                self._bar.refresh()
        else:
            self.scored_tokens += count
            if self._bar is not None and count:
                self._bar.update(count)
        self._rounds += 1
        self.agreed = int(mark.item())
        return bool(self.agreed)
