"""Writes that a kill at any moment cannot leave half done: the file or folder is written under another name beside
its target, flushed to disk, then renamed over it (a rename within one folder is atomic). Checkpoints, the
entropy cache, the evaluation figures and converted models are all written this way."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk: a rename is durable only once its folder is (some systems cannot open
    folders, and then nothing is done)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def staged_file(path: str | os.PathLike, staging_name: str | None = None) -> Iterator[Path]:
    """Yields the path to write ``path``'s new content to (``staging_name`` beside it; default
    ``.<name>.partial-<pid>``, hidden and not named like the target). When the block ends the file is flushed to
    disk and renamed to ``path``; when it raises, the staging file is deleted and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(staging_name or f".{path.name}.partial-{os.getpid()}")
    try:
        yield staging
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def publish_folder(target: Path, write: Callable[[Path], None], marker: str | None = None) -> Path:
    """Run ``write(folder)`` into a staging folder beside ``target``, then rename it to ``target`` (replacing an
    older one); ``marker``, when given, is a file written last, so a reader can tell a complete folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(staging)
        if marker is not None:
            (staging / marker).write_text("complete\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_folder(target.parent)
    return target


@contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock named after ``target`` (a hidden ``.<name>.lock`` file beside it) for the block:
    processes that start together (the ranks of a node) build one ``target`` between them, the others wait,
    then find it complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
