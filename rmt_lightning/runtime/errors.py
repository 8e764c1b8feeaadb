"""``InputError`` and the small checks every layer uses on its own inputs: each bad input gets one error that names
it and what would be valid. The checks of a whole run (the model, the rollout's length) are in ``checks.py``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class InputError(ValueError):
    """An input the run cannot use: a configuration value, a path, a corpus, a model or a checkpoint file."""


@contextmanager
def as_input_error(prefix: str = "") -> Iterator[None]:
    """Re-raise a ``ValueError`` of a value check (e.g. the pure ``method`` functions) as an ``InputError``."""
    try:
        yield
    except InputError:
        raise
    except ValueError as error:
        raise InputError(f"{prefix}{error}") from None


def at_least(name: str, value, minimum) -> None:
    """``value >= minimum``, else an InputError naming ``name``."""
    if not value >= minimum:
        raise InputError(f"{name}={value!r} is not valid: it must be >= {minimum}")


def between(name: str, value, low, high) -> None:
    """``low <= value <= high``, else an InputError naming ``name``."""
    if not low <= value <= high:
        raise InputError(f"{name}={value!r} is not valid: it must be in [{low}, {high}]")


def in_open_interval(name: str, value, low: float, high: float) -> None:
    """``low < value < high``, else an InputError naming ``name``."""
    if not low < value < high:
        raise InputError(f"{name}={value!r} is not valid: it must be in ({low}, {high})")


def names_a_local_path(source: str) -> bool:
    """Whether ``source`` (a model or corpus) means something on this machine rather than a hub id: a hub id is
    ``name`` or ``org/name``; what exists here, starts like a path (``/``, ``./``, ``../``, ``~``) or has any other
    separator is a path."""
    return (Path(source).expanduser().exists() or source.startswith(("/", "./", "../", "~", ".\\"))
            or "\\" in source or source.count("/") > 1 or source.endswith("/"))


def check_writable_directory(path: str | os.PathLike, what: str) -> None:
    """``path`` exists as a folder that takes new files, or can be created; creates nothing."""
    if "://" in str(path):
        return  # remote storage: its client reports its own errors
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} '{path}' cannot be created: '{existing}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(f"{what} '{path}' is not writable ({error.strerror} in '{existing}'); choose another folder") from None
