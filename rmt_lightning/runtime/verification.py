"""Answer verification that cannot hang a rank: ``method.answers.verify_parsed`` runs in worker processes, each
completion under a hard wall-clock limit.

math-verify's own time limits are SIGALRM-based: they work on a process's main thread only and cannot stop a hang
inside sympy (math-verify's issue #65; verl moved verification to worker processes with a hard limit for the same
reason). Here a completion whose check makes no progress for ``timeout_s`` is given up: the workers are killed
and started again, the others are checked again, and the hung one scores 0 and is counted as a timeout.

The workers ignore SIGINT, SIGTERM and SIGUSR1, so a preemption signal sent to the whole job reaches the trainer's
handlers (which checkpoint and stop) and not a verification half done, and they exit on their own when the
trainer's process is gone.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from ..method.answers import verify_parsed

__all__ = ["AnswerVerifier", "Verdicts", "check_answer"]

_START_TIMEOUT_S = 300.0
"""How long the workers may take to start (a cold start imports torch and sympy)."""



def _watch_trainer(trainer_pid: int) -> None:
    while True:
        try:
            os.kill(trainer_pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass
        time.sleep(1.0)


def _start_worker(trainer_pid: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if signum is not None:
            signal.signal(signum, signal.SIG_IGN)
    threading.Thread(target=_watch_trainer, args=(trainer_pid,), daemon=True).start()


def _ready() -> bool:
    return True


def check_answer(reference: list, completion: str, timeout: int, answer_format: str = "boxed") -> bool:
    """One completion's check, as a worker runs it (``method.answers.verify_parsed``)."""
    return verify_parsed(reference, completion, timeout, answer_format)


@dataclass
class Verdicts:
    """What one call of ``AnswerVerifier.verify`` found."""

    correct: list[bool]
    """Whether each completion's answer equals its reference (a timed-out one: False)."""
    timeouts: int
    """Completions given up on after ``timeout_s`` without progress (scored 0)."""


class AnswerVerifier:
    """Checks completions against parsed references in ``workers`` processes, each completion bounded by
    ``timeout_s`` seconds of wall-clock time (``method.answers.verify_parsed``, with math-verify's own limit of
    ``inner_timeout_s`` inside each worker).

    The workers start on first use and live until ``close``; ``function`` replaces the check (tests hang it).
    """

    def __init__(self, workers: int = 1, timeout_s: float = 10.0, inner_timeout_s: int = 5, function=check_answer):
        if workers < 1:
            raise ValueError(f"verification workers must be >= 1, got {workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"verification timeout_s must be > 0, got {timeout_s!r}")
        self.workers, self.timeout_s, self.inner_timeout_s = int(workers), float(timeout_s), int(inner_timeout_s)
        self.function = function
        self._pool: ProcessPoolExecutor | None = None
        self.restarts = 0
        """How many times the workers were killed and started again (hung checks, or a worker that died)."""
        # Once per verifier, not per start of its workers (a restart would register it again).
        atexit.register(self.close)

    def _start(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # forkserver, not fork: the trainer's process holds threads (loggers, torch's pools) that a fork would
            # copy mid-lock; spawn would work too at a slower start.
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                             initializer=_start_worker, initargs=(os.getpid(),))
            # Started and importing before the first check's clock runs: a slow start is not a hung check.
            for ready in [self._pool.submit(_ready) for _ in range(self.workers)]:
                ready.result(timeout=_START_TIMEOUT_S)
        return self._pool

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list(getattr(pool, "_processes", {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        self.restarts += 1

    def verify(self, references: list[list], completions: list[str]) -> Verdicts:
        """Whether each completion's last ``\\boxed{}`` equals its reference (``references[i]``: the parsed
        acceptable answers, ``method.answers.parse_reference``)."""
        if len(references) != len(completions):
            raise ValueError(f"{len(references)} references for {len(completions)} completions")
        correct = [False] * len(completions)
        queue = [i for i, reference in enumerate(references) if reference]
        queue.reverse()
        timeouts = 0
        in_flight: dict[Future, int] = {}
        while queue or in_flight:
            pool = self._start()
            # No more checks in flight than workers, so every one in flight is running: when none finishes for
            # timeout_s, each of them has run that long.
            while queue and len(in_flight) < self.workers:
                i = queue.pop()
                in_flight[pool.submit(self.function, references[i], completions[i], self.inner_timeout_s)] = i
            done, _ = wait(in_flight, timeout=self.timeout_s, return_when=FIRST_COMPLETED)
            if not done:
                timeouts += len(in_flight)  # each hung: scored 0
                in_flight.clear()
                self._kill()
                continue
            for future in done:
                i = in_flight.pop(future)
                try:
                    correct[i] = bool(future.result())
                except BrokenProcessPool:
                    queue.append(i)  # a worker died under it: checked again by fresh workers
                    self._kill()
                except Exception:
                    correct[i] = False  # math-verify raising on an odd answer: wrong
            if self._pool is None:
                queue.extend(in_flight.values())
                in_flight.clear()
        return Verdicts(correct, timeouts)

    def close(self) -> None:
        """Stop the workers."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __getstate__(self):
        # A module holding a verifier is deep-copied and pickled (checkpoints, DDP spawn): the workers stay behind.
        state = self.__dict__.copy()
        state["_pool"] = None
        return state
