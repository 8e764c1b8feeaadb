"""Chaos run: train configs/tiny.yaml while killing it (SIGKILL) at random moments, resume each time with
``--ckpt_path last``, and check that nothing was corrupted and the result is the uninterrupted run's.

A SIGKILL cannot be caught: it is what an out-of-memory killer, a node failure or a scheduler past its grace
period does. The kills land inside training steps, inside checkpoint writes (while a hidden partial file of
the checkpoint, ``.<name>.partial-<pid>``, ``.<name>.partial`` or ``..<name>.partial.partial-<pid>``, is in the
checkpoint folder) and, on the very first run, while the entropy cache is scored or written.
After each kill every checkpoint file must load (CRC-checked, ``weights_only``), the entropy cache must be
absent or complete, and the restart must resume from the newest complete checkpoint, losing at most the steps
since it (with a checkpoint every step: at most the one in flight). At the end the policy weights must be
bit-identical to the uninterrupted run's, and so must the per-step ``train/loss`` values.

Kill timing is racy by nature: a kill aimed at a checkpoint or cache write that lands after the write is
recorded as what it was, and the aimed-at kind is tried again (the cache kill by starting the interrupted run
over). The plan (what to aim at, at which step, with which delays) is drawn from ``random.Random(seed)``.

Command line: ``python tests/chaos.py --kills 8 --seed 0 --workdir /tmp/chaos``; prints the summary as JSON and
exits with status 1 when a check failed. ``run_chaos`` returns the same summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from rmt_lightning.callbacks.checkpoints import PERIODIC_NAME  # noqa: E402
from rmt_lightning.runtime.checkpointing import AtomicCheckpointIO  # noqa: E402
from rmt_lightning.data import entropy_shards  # noqa: E402

# A checkpoint being written: AtomicCheckpointIO's temporary file (.<name>.partial-<pid>), and for periodic and
# preemption checkpoints the hidden name they are written under before the rename into place (.<name>.partial),
# with AtomicCheckpointIO's temporary file of that (..<name>.partial.partial-<pid>).
PARTIAL = re.compile(r"^\.{1,2}(?P<name>[^.].*?\.ckpt)(?:\.partial(?:-\d+)?)+$")
# An entropy shard being written (``entropy-<key>/.shard-<i>.safetensors.partial-<host>-<pid>``) and an index
# being built (its staging folder ``index-<key>.<random>``).
CACHE_TMP = re.compile(r"^\.shard-\d+\.safetensors\.partial-.+-(?P<pid>\d+)$")
INDEX_STAGING = re.compile(r"^index-[0-9a-f]{24}\.")
RESUMED = re.compile(r"ckpt_path='last': resuming from (?P<path>\S+\.ckpt)")
CACHE_REJECTED = "entropy shard '"
PROXY_LOADING = "Loading weights"  # the first model a fresh run loads is the proxy that scores the corpus

STEP, CHECKPOINT, CACHE = "step", "checkpoint write", "cache build"


class ChaosError(RuntimeError):
    """A run failed or hung: the chaos run cannot go on."""


def write_config(workdir: Path, name: str, every_n_steps: int, epochs: int, batches_per_epoch: int,
                 keep_last: int = 2, cache_dir: Path | None = None) -> Path:
    """configs/tiny.yaml with a periodic checkpoint every ``every_n_steps`` steps (the newest ``keep_last`` kept),
    its logs under ``workdir/logs/<name>`` and its own entropy cache folder (default ``workdir/cache-<name>``, so
    the interrupted run builds the cache itself, and can be killed while it does)."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"].update(max_epochs=epochs, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(workdir / "logs"), name=name)
    config["trainer"]["callbacks"].append(
        {"class_path": "rmt_lightning.PeriodicCheckpoint", "init_args": {"every_n_steps": every_n_steps, "keep_last": keep_last}}
    )
    config["data"].update(batches_per_epoch=batches_per_epoch, cache_dir=str(cache_dir or workdir / f"cache-{name}"))
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_STARTED: list[Run] = []


class Run:
    """``python -m rmt_lightning fit`` in its own process group (so a kill takes every process it started),
    its output in a log file."""

    def __init__(self, config: Path, log: Path, *args: str):
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rmt_lightning", "fit", "--config", str(config), *args],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = self.process.pid
        _STARTED.append(self)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until none of it is left."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.wait_group_gone()

    def wait_group_gone(self, timeout: float = 10.0) -> bool:
        """Whether no process of the group is left (children of a killed leader may take a moment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return True
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        return False

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChaosError(f"run {self.log.name} did not finish within {timeout:.0f} s:\n{tail(self.output())}") from None

    def resumed_from(self) -> str | None:
        found = RESUMED.search(self.output())
        return found.group("path") if found else None


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def checkpoint_folders(workdir: Path, name: str) -> list[Path]:
    return sorted((workdir / "logs" / name).glob("version_*/checkpoints"), key=lambda f: int(f.parent.name.split("_")[1]))


def version_folders(workdir: Path, name: str) -> list[Path]:
    return [folder.parent for folder in checkpoint_folders(workdir, name)] or sorted((workdir / "logs" / name).glob("version_*"))


def listing(folders: list[Path]) -> list[Path]:
    found = []
    for folder in folders:
        try:
            found.extend(folder / entry for entry in os.listdir(folder))
        except FileNotFoundError:
            pass
    return found


def periodic_step(path: Path) -> int | None:
    match = PERIODIC_NAME.match(path.name)
    return int(match.group(1)) if match else None


def partial_files(workdir: Path, name: str, known: set[Path] = frozenset()) -> list[Path]:
    """Partial checkpoint files in the run's checkpoint folders, except those in ``known``."""
    return [p for p in listing(checkpoint_folders(workdir, name)) if PARTIAL.match(p.name) and p not in known]


def partial_step(path: Path) -> int | None:
    """The step of a partial periodic checkpoint file (None: another kind of checkpoint)."""
    return periodic_step(Path(PARTIAL.match(path.name).group("name")))


class CheckpointCensus:
    """Loads every ``*.ckpt`` of a run (each file once per size and modification time) and keeps their
    ``global_step``; the files that fail to load are the corrupt ones."""

    def __init__(self):
        self.steps: dict[str, int] = {}
        self.corrupt: dict[str, str] = {}
        self._seen: dict[str, tuple[int, int]] = {}
        self.loaded = 0

    def verify(self, workdir: Path, name: str) -> int | None:
        """Load every checkpoint now in the run's folders; the largest ``global_step`` among them (None: none)."""
        newest = None
        for path in listing(checkpoint_folders(workdir, name)):
            if not path.name.endswith(".ckpt"):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._seen.get(str(path)) != signature:
                self._seen[str(path)] = signature
                try:
                    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
                    self.steps[str(path)] = int(checkpoint["global_step"])
                    self.corrupt.pop(str(path), None)
                    self.loaded += 1
                except Exception as error:  # the point is to count these, not to stop at the first
                    self.corrupt[str(path)] = f"{type(error).__name__}: {error}"
                    self.steps.pop(str(path), None)
            if str(path) in self.steps:
                newest = max(newest or 0, self.steps[str(path)])
        return newest


def verify_cache(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The entropy cache in ``folder``: its whole shard files and built index folders by name (relative to
    ``folder``), and the damaged shards (data not matching their SHA-256)."""
    from safetensors import safe_open

    good, damaged = {}, {}
    for path in sorted(folder.glob("entropy-*/shard-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                flat, lengths = handle.get_tensor("entropy"), handle.get_tensor("lengths")
            if metadata.get("sha256") != entropy_shards._digest(flat, lengths):
                raise ValueError("data does not match its SHA-256")
            good[str(path.relative_to(folder))] = path
        except Exception as error:
            damaged[str(path)] = f"{type(error).__name__}: {error}"
    for index in sorted(folder.glob("index-*")):
        if index.is_dir() and not INDEX_STAGING.match(index.name) and (index / "manifest.json").exists():
            good[index.name] = index
    return good, damaged


def index_built(good: dict[str, Path]) -> bool:
    return any(name.startswith("index-") for name in good)


def same_cache(a: dict[str, Path], b: dict[str, Path]) -> bool:
    """The same shards (equal scores) and indexes (equal files) under the same names."""
    from safetensors.torch import load_file

    if a.keys() != b.keys():
        return False
    for name in a:
        if a[name].is_dir():
            files = sorted(f.name for f in a[name].iterdir())
            if files != sorted(f.name for f in b[name].iterdir()) or any(
                    (a[name] / f).read_bytes() != (b[name] / f).read_bytes() for f in files if f != "manifest.json"):
                return False
        else:
            left, right = load_file(str(a[name])), load_file(str(b[name]))
            if left.keys() != right.keys() or not all(torch.equal(left[k].nan_to_num(-1.0), right[k].nan_to_num(-1.0)) for k in left):
                return False
    return True


def losses(version: Path) -> dict[int, float]:
    """``train/loss`` by step from a version folder's TensorBoard events (those written before a kill)."""
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")} if "train/loss" in events.Tags()["scalars"] else {}


def union_of_losses(workdir: Path, name: str) -> dict[int, float]:
    """The run's per-step losses over all its versions, a later version's value replacing an earlier one's for
    a step it ran again."""
    merged: dict[int, float] = {}
    versions = sorted((workdir / "logs" / name).glob("version_*"), key=lambda f: int(f.name.split("_")[1]))
    for version in versions:
        merged.update(losses(version))
    return merged


def final_checkpoint(workdir: Path, name: str) -> Path:
    """``last.ckpt`` of the run's newest version folder (the run that finished)."""
    [*_, last] = [folder / "last.ckpt" for folder in checkpoint_folders(workdir, name) if (folder / "last.ckpt").exists()]
    return last


def compare_weights(reference: Path, candidate: Path) -> tuple[bool, float, list[str]]:
    """Whether every tensor of the two checkpoints' ``state_dict`` is equal, the largest absolute difference and
    the names that differ."""
    left = AtomicCheckpointIO().load_checkpoint(reference)["state_dict"]
    right = AtomicCheckpointIO().load_checkpoint(candidate)["state_dict"]
    differing = sorted(set(left) ^ set(right))
    largest = 0.0
    for key in set(left) & set(right):
        a, b = left[key], right[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            differing.append(key)
            largest = float("inf")
            continue
        if not torch.equal(a, b):
            differing.append(key)
        if a.is_floating_point() and a.numel():
            largest = max(largest, float((a.double() - b.double()).abs().max()))
    return not differing, largest, sorted(differing)


def _poll(run: Run, found, timeout: float, interval: float):
    """``found()`` once it is truthy, or None when the run ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result
        if not run.alive():
            return None
        time.sleep(interval)
    run.kill()
    raise ChaosError(f"run {run.log.name}: the moment to kill at did not come within {timeout:.0f} s:\n{tail(run.output())}")


def step_seconds(workdir: Path, name: str) -> float:
    """Seconds per training step of the reference run (from its TensorBoard event times)."""
    [version] = version_folders(workdir, name)
    events = EventAccumulator(str(version), size_guidance={"scalars": 0})
    events.Reload()
    times = [e.wall_time for e in events.Scalars("train/loss")]
    return (times[-1] - times[0]) / max(1, len(times) - 1)


def run_chaos(workdir, kills: int = 8, seed: int = 0, every_n_steps: int = 1, epochs: int = 3,
              batches_per_epoch: int = 8, timeout: float = 300.0, avoid_epoch_ends: bool = False) -> dict:
    """Reference run, then the same run killed ``kills`` times (the first kill during the entropy-cache build,
    at least one during a checkpoint write, the others inside training steps) and resumed with
    ``--ckpt_path last`` after each; returns the summary (``ok``: every check passed, ``problems``: those that
    did not). No process it started outlives it, whether it returns or raises.

    ``avoid_epoch_ends``: aim no kill where the restart would resume from a checkpoint of an epoch's last step
    (the last step of an epoch, the step after it, the epoch-end checkpoint writes), so that the run never
    resumes twice across an epoch's end; ``epoch_end_resumes`` in the summary counts the resumes from such a
    checkpoint either way.
    """
    try:
        return _run_chaos(workdir, kills, seed, every_n_steps, epochs, batches_per_epoch, timeout, avoid_epoch_ends)
    finally:
        while _STARTED:
            run = _STARTED.pop()
            if run.alive():
                run.kill()


def _run_chaos(workdir, kills, seed, every_n_steps, epochs, batches_per_epoch, timeout, avoid_epoch_ends) -> dict:
    started = time.monotonic()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    total_steps = epochs * batches_per_epoch
    problems: list[str] = []
    leftover = 0

    reference_config = write_config(workdir, "reference", every_n_steps, epochs, batches_per_epoch)
    chaos_config = write_config(workdir, "chaos", every_n_steps, epochs, batches_per_epoch)
    for old in (workdir / "logs" / "reference", workdir / "cache-reference"):
        shutil.rmtree(old, ignore_errors=True)
    reference = Run(reference_config, workdir / "reference.log")
    if reference.finish(timeout) != 0:
        raise ChaosError(f"the reference run failed:\n{tail(reference.output())}")
    leftover += not reference.wait_group_gone()
    seconds_per_step = step_seconds(workdir, "reference")

    # What each kill aims at: the cache build first, then training steps and checkpoint writes.
    training_kills = max(0, kills - 1)
    plan = [CHECKPOINT] * min(training_kills, max(1, training_kills // 3))
    plan += [STEP] * (training_kills - len(plan))
    rng.shuffle(plan)

    census = CheckpointCensus()
    records: list[dict] = []
    cache_attempts = 0
    missed = 0
    log_index = 0

    def start(*args: str) -> Run:
        nonlocal log_index
        log_index += 1
        return Run(chaos_config, workdir / f"chaos-{log_index:02d}.log", *args)

    def after_kill(run: Run, aimed: str, newest_before: int | None, known: set[Path]) -> dict:
        """Classify where the kill landed and verify the checkpoints and the cache."""
        nonlocal leftover
        leftover += not run.wait_group_gone()
        left_partial = partial_files(workdir, "chaos", known)
        newest = census.verify(workdir, "chaos")
        cache_folder = workdir / "cache-chaos"
        good, damaged = verify_cache(cache_folder) if cache_folder.is_dir() else ({}, {})
        cache_tmp = [p.name for p in cache_folder.glob("entropy-*/.*") if CACHE_TMP.match(p.name) and int(CACHE_TMP.match(p.name).group("pid")) == run.pid]
        cache_tmp += [p.name for p in cache_folder.glob("index-*") if INDEX_STAGING.match(p.name)]
        if aimed == CACHE:
            landed = CACHE if not index_built(good) else STEP if newest is not None else "startup"
        else:
            landed = CHECKPOINT if left_partial else STEP
        reached = newest or 0
        for partial in left_partial:
            step = partial_step(partial)
            if step is not None:
                reached = max(reached, step)  # the step finished; its checkpoint did not
        if landed == STEP:
            reached += 1  # the step in flight
        logged = losses(run_version) if (run_version := newest_version(workdir, "chaos")) else {}
        if logged and landed == STEP:
            reached = max(reached, max(logged) + 2)  # logged step s is optimizer step s + 1; the next one was in flight
        return {
            "aimed_at": aimed, "landed": landed, "step_reached": reached if landed != CACHE else 0,
            "newest_checkpoint_step": newest, "newest_checkpoint_step_before": newest_before,
            "partial_files_left": [p.name for p in left_partial], "cache_tmp_left": cache_tmp,
            "cache_complete": index_built(good), "cache_damaged": damaged,
        }

    def note_resume(run: Run) -> None:
        """Fill in the previous kill's record from where ``run`` resumed."""
        if not records or "resumed_from_step" in records[-1]:
            return
        record = records[-1]
        path = run.resumed_from()
        if path is None:
            step = 0
            if record["newest_checkpoint_step"] is not None:
                problems.append(f"kill {len(records)}: the restart started from the beginning although "
                                f"a checkpoint of step {record['newest_checkpoint_step']} existed")
        else:
            step = census.steps.get(path)
            if step is None:
                step = int(AtomicCheckpointIO().load_checkpoint(path)["global_step"])
        record["resumed_from"] = path
        record["resumed_from_step"] = step
        record["steps_lost"] = max(0, record["step_reached"] - step)
        if record["newest_checkpoint_step"] is not None and step != record["newest_checkpoint_step"]:
            problems.append(f"kill {len(records)}: resumed from step {step}, not from the newest checkpoint "
                            f"(step {record['newest_checkpoint_step']})")
        if CACHE_REJECTED in run.output():
            problems.append(f"kill {len(records)}: the restart found a damaged entropy cache: "
                            f"{[line for line in run.output().splitlines() if CACHE_REJECTED in line]}")

    # The first run builds the entropy cache; it is killed while it scores the corpus or writes the file.
    while True:
        cache_attempts += 1
        if cache_attempts > 5:
            raise ChaosError("the entropy-cache build was not hit in 5 tries")
        for old in (workdir / "logs" / "chaos", workdir / "cache-chaos"):
            shutil.rmtree(old, ignore_errors=True)
        run = start("--ckpt_path", "last")
        cache_folder = workdir / "cache-chaos"
        # Aim at the file write (a few milliseconds) or at the scoring before it (a random delay after the
        # proxy is loaded); after a miss, at the scoring, which is longer.
        at_write = cache_attempts == 1 and rng.random() < 0.5
        delay = rng.uniform(0.0, 0.2)

        def cache_write():
            # A shard's write started (or is already over, or the index is being built: a miss).
            return any(CACHE_TMP.match(p.name) or p.name.startswith("shard-") for p in cache_folder.glob("entropy-*/*")) \
                or any(cache_folder.glob("index-*"))

        def scoring():
            return cache_write() or PROXY_LOADING in run.output()

        # The proxy is loaded after several seconds of start-up; the file write then takes a millisecond or
        # less, so it is watched for without pause.
        if _poll(run, scoring, timeout, 0.005) is None or (at_write and _poll(run, cache_write, timeout, 0.0) is None):
            raise ChaosError(f"the first run ended before the cache was built:\n{tail(run.output())}")
        if not at_write:
            time.sleep(delay)
        run.kill()
        record = after_kill(run, CACHE, None, set())
        if record["landed"] == CACHE:
            record["detail"] = "cache write" if record["cache_tmp_left"] else "scoring, before a shard was written"
            records.append(record)
            break
        missed += 1

    # Kills inside training: each aimed at a step after the newest checkpoint, leaving room for the rest.
    finished = None  # a run that ended before it could be killed
    while plan:
        newest_before = census.verify(workdir, "chaos")
        done = newest_before or 0
        reach = done + 1 + max(1, (total_steps - 2 - done) // len(plan))
        allowed = [step for step in range(done + 2, total_steps) if not (avoid_epoch_ends and step % batches_per_epoch in (0, 1))]
        if not allowed:
            problems.append(f"no training step left to kill in for {len(plan)} more kill(s)")
            break
        near = [step for step in allowed if step <= reach]
        target = rng.choice(near) if near else allowed[0]
        aimed = plan[0]
        known = set(listing(checkpoint_folders(workdir, "chaos")))
        run = start("--ckpt_path", "last")

        def new_checkpoint(at_least: int):
            def found():
                for path in listing(checkpoint_folders(workdir, "chaos")):
                    if path not in known and (step := periodic_step(path)) is not None and step >= at_least:
                        return path
                return None
            return found

        def partial_write(folder: Path, at_least: int):
            def found():
                for entry in os.listdir(folder):
                    if PARTIAL.match(entry) and folder / entry not in known:
                        step = partial_step(folder / entry)
                        if (step is None and not avoid_epoch_ends) or (step is not None and step >= at_least):
                            return folder / entry
                return None
            return found

        if aimed == STEP:
            # After the checkpoint of the step before, somewhere inside the target step.
            moment = _poll(run, new_checkpoint(target - every_n_steps), timeout, 0.005)
            if moment is not None:
                time.sleep(rng.uniform(0.1, 0.9) * seconds_per_step * every_n_steps)
        else:
            # A write takes a millisecond or less when the disk is idle: from the step before's checkpoint on, the
            # folder is watched without pause.
            moment = _poll(run, new_checkpoint(target - 1), timeout, 0.005)
            if moment is not None:
                moment = _poll(run, partial_write(moment.parent, target), timeout, 0.0)
        if moment is None:
            finished = run
            problems.append(f"the run finished before kill {len(records) + 1} ({aimed} at step {target})")
            break
        note_resume(run)
        run.kill()
        record = after_kill(run, aimed, newest_before, known)
        record["target_step"] = target
        if record["landed"] == CHECKPOINT:
            record["detail"] = ", ".join(record["partial_files_left"])
        records.append(record)
        if record["landed"] == aimed:
            plan.pop(0)
        else:
            missed += 1
            # The kill happened anyway: it takes the place of one of its kind still planned, if any, and the
            # aimed-at kind is tried again.
            if record["landed"] in plan:
                plan.remove(record["landed"])
            if missed > 2 * kills:
                problems.append(f"{missed} kills missed what they aimed at; gave up on {plan}")
                break

    # The last run finishes.
    run = finished or start("--ckpt_path", "last")
    status = run.finish(timeout)
    leftover += not run.wait_group_gone()
    note_resume(run)
    if status != 0:
        raise ChaosError(f"the final run failed with status {status}:\n{tail(run.output())}")
    census.verify(workdir, "chaos")

    # Checks of the outcome.
    good, damaged = verify_cache(workdir / "cache-chaos")
    reference_cache = verify_cache(workdir / "cache-reference")[0]
    cache_equal = index_built(reference_cache) and same_cache(good, reference_cache)
    reference_last, chaos_last = final_checkpoint(workdir, "reference"), final_checkpoint(workdir, "chaos")
    weights_equal, max_diff, differing = compare_weights(reference_last, chaos_last)
    final_step = census.steps.get(str(chaos_last))
    reference_losses, chaos_losses = union_of_losses(workdir, "reference"), union_of_losses(workdir, "chaos")
    missing_steps = sorted(set(reference_losses) - set(chaos_losses))
    extra_steps = sorted(set(chaos_losses) - set(reference_losses))
    differing_steps = sorted(s for s in set(reference_losses) & set(chaos_losses) if reference_losses[s] != chaos_losses[s])
    steps_lost = [r.get("steps_lost") for r in records]
    stale = [p.name for p in partial_files(workdir, "chaos")]
    stale += [p.name for p in (workdir / "cache-chaos").glob("entropy-*/.*") if CACHE_TMP.match(p.name)]
    stale += [p.name for p in (workdir / "cache-chaos").glob("index-*") if INDEX_STAGING.match(p.name)]

    if census.corrupt:
        problems.append(f"corrupt checkpoints: {census.corrupt}")
    if damaged or any(r["cache_damaged"] for r in records):
        problems.append(f"damaged entropy cache: {damaged or [r['cache_damaged'] for r in records]}")
    if not cache_equal:
        problems.append("the rebuilt entropy cache differs from the reference run's")
    if any(lost is None or lost > every_n_steps for lost in steps_lost):
        problems.append(f"steps lost per kill {steps_lost}: more than every_n_steps={every_n_steps}")
    if final_step != total_steps:
        problems.append(f"the interrupted run ended at step {final_step}, not {total_steps}")
    if not weights_equal:
        problems.append(f"final weights differ from the reference (max abs difference {max_diff}): {differing[:5]}")
    if missing_steps or extra_steps or differing_steps or len(reference_losses) != total_steps:
        problems.append(f"train/loss differs from the reference: missing steps {missing_steps}, extra {extra_steps}, "
                        f"different values at {differing_steps}")
    if leftover:
        problems.append(f"{leftover} process group(s) still had processes after their run ended")
    if len(records) < kills:
        problems.append(f"only {len(records)} of {kills} kills happened")

    return {
        "ok": not problems,
        "problems": problems,
        "kills": len(records),
        "landed": [r["landed"] for r in records],
        "steps_lost": steps_lost,
        "corrupt_checkpoints": len(census.corrupt),
        "corrupt_caches": len(damaged) + sum(len(r["cache_damaged"]) for r in records),
        "checkpoints_verified": census.loaded,
        "final_weights_equal": weights_equal,
        "max_abs_weight_diff": max_diff,
        "losses_equal": not (missing_steps or extra_steps or differing_steps),
        "loss_steps_compared": len(reference_losses),
        "final_step": final_step,
        "total_steps": total_steps,
        "rebuilt_cache_equal": cache_equal,
        "missed_targets": missed,
        "epoch_end_resumes": sum(0 < (r.get("resumed_from_step") or 0) < total_steps
                                 and r["resumed_from_step"] % batches_per_epoch == 0 for r in records),
        "cache_attempts": cache_attempts,
        "leftover_process_groups": leftover,
        "stale_partial_files": stale,
        "seconds": round(time.monotonic() - started, 1),
        "seed": seed,
        "every_n_steps": every_n_steps,
        "records": records,
    }


def newest_version(workdir: Path, name: str) -> Path | None:
    versions = sorted((workdir / "logs" / name).glob("version_*"), key=lambda f: int(f.name.split("_")[1]))
    return versions[-1] if versions else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=8, help="kills (the first during the entropy-cache build)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan and timing")
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the configs, logs, checkpoints and caches")
    parser.add_argument("--every-n-steps", type=int, default=1, help="steps between periodic checkpoints")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches-per-epoch", type=int, default=8)
    parser.add_argument("--avoid-epoch-ends", action="store_true",
                        help="aim no kill where the restart would resume from an epoch's last step")
    args = parser.parse_args(argv)
    summary = run_chaos(args.workdir, kills=args.kills, seed=args.seed, every_n_steps=args.every_n_steps,
                        epochs=args.epochs, batches_per_epoch=args.batches_per_epoch,
                        avoid_epoch_ends=args.avoid_epoch_ends)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
