"""A tokenized corpus on disk, memory-mapped by every process that reads it.

A store is a folder of three files:

- ``tokens.bin``: every document's token ids back to back, raw, in the smallest unsigned dtype that holds the
  tokenizer's vocabulary (uint16 up to 65,536 ids, else uint32);
- ``offsets.npy``: int64, one entry per document plus one; document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``;
- ``manifest.json``: the format version, the key, the tokenizer's identity, the dtype, the counts and the source
  and read settings the store was made from.

Documents are tokenized as ``corpus.tokenize_documents`` does (no BOS/EOS, long documents cut into chunks of at
most ``max_document_tokens``, chunks under ``min_document_tokens`` dropped), in parallel worker processes, and
written batch by batch, so no process ever holds the corpus's tokens as Python objects. The folder is written
under another name and renamed into place (``atomic.publish_folder``): a killed build leaves no store, only a
staging folder that the next build of the same key deletes. A store lives under a folder named after its key
(tokenizer identity and settings), so a store made for other settings is never opened in place of this one.

``iter_texts`` reads a corpus with ``datasets`` streaming (hub datasets and local files alike), so the first
``max_documents`` documents or ``max_tokens`` tokens of a large corpus are read without downloading all of it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.atomic import build_lock, fsync_folder, publish_folder
from ..runtime.errors import InputError, check_writable_directory
from .corpus import (
    _LOCAL_BUILDERS,
    EMBEDDED_CORPUS,
    _is_local,
    check_corpus_source,
    template_fields,
)

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
MANIFEST_FILE = "manifest.json"
BUILDER_FILE = "builder.json"
"""Written first into a staging folder: which host and process is writing it."""

HASH_BLOCK_BYTES = 64 << 20
"""Block size of the content hash: large reads, whatever the documents' sizes."""

BATCH_TEXTS = 1000
"""Texts per tokenization task: large enough that a worker's round trip is small against its work."""

_COUNT_BATCH = 64
"""Texts tokenized at once to count tokens against ``max_tokens``: the reader reads at most this many past the
last text it keeps."""


def token_dtype(vocabulary_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary of ``vocabulary_size`` tokens."""
    if vocabulary_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocabulary_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise InputError(f"tokenizer vocabulary of {vocabulary_size} tokens does not fit uint32 ids; valid: at most {1 << 32}")


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer's ids: its name or path, class, length and a short hash of its vocabulary and
    merges (the serialized fast tokenizer when there is one, else the sorted vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = backend.to_str()
    else:
        content = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "length": len(tokenizer),
        "vocabulary_sha256": hashlib.sha256(content.encode()).hexdigest()[:16],
    }


def _source_stamp(source: str) -> str | None:
    # A local corpus edited in place must give another key: its files' sizes and modification times stand for
    # its content (hashing it would read the whole corpus on every start).
    if source == EMBEDDED_CORPUS or not _is_local(source):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        return None  # reading it reports that
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = []
    for file in files:
        stat = file.stat()
        parts.append(f"{file.relative_to(path) if file != path else file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CorpusSource:
    """Which texts a corpus gives: where it is and how its records are read (the data module's corpus keys)."""

    corpus: str
    """The embedded corpus, a local jsonl/json/txt/parquet/csv file or folder, or a hub dataset."""
    split: str = "train"
    text_field: str = "text"
    text_template: str | None = None
    """A ``str.format`` template over the record's fields (instead of ``text_field``)."""
    subset: str | None = None
    """The hub dataset's configuration (subset)."""
    max_documents: int | None = None
    """The first records only (None: all)."""
    max_tokens: int | None = None
    """The first texts whose tokens add up to at most this (None: all)."""
    embedded_documents: int = 2000
    """Documents of the embedded corpus."""
    seed: int = 0
    """Seed of the embedded corpus."""

    @classmethod
    def from_settings(cls, settings: dict) -> CorpusSource:
        """The source ``read_settings`` recorded (which leaves the embedded corpus's size and seed out, as None, for
        other corpora: they read the defaults, which change nothing there)."""
        return cls(settings["corpus"], settings["split"], settings["text_field"], settings["text_template"],
                   settings["subset"], settings["max_documents"], settings["max_tokens"],
                   settings["embedded_documents"] or cls.embedded_documents, settings["seed"] or cls.seed)


def read_settings(source: CorpusSource) -> dict:
    """The settings that decide which texts ``iter_texts`` reads, as a manifest records them and a key hashes them.

    ``embedded_documents`` and ``seed`` only change the embedded corpus, so they are recorded (as None otherwise)
    only for it; a local corpus also records a stamp of its files' sizes and times, so editing it changes the key.
    """
    embedded = source.corpus == EMBEDDED_CORPUS
    return {
        "corpus": source.corpus, "split": source.split, "subset": source.subset, "text_field": source.text_field,
        "text_template": source.text_template, "max_documents": source.max_documents, "max_tokens": source.max_tokens,
        "embedded_documents": source.embedded_documents if embedded else None, "seed": source.seed if embedded else None,
        "source_stamp": _source_stamp(source.corpus),
    }


def _full_settings(settings: dict, max_document_tokens: int, min_document_tokens: int) -> dict:
    return {**settings, "max_document_tokens": max_document_tokens, "min_document_tokens": min_document_tokens}


def store_key(tokenizer_identity: dict, source_settings: dict) -> str:
    """Key of a store: a SHA-256 of the format version, the tokenizer identity and every source, read and
    chunking setting (``source_settings`` must be JSON values)."""
    payload = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_identity, "settings": source_settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def store_folder(cache_dir: str | os.PathLike, key: str) -> Path:
    """Folder of the store for ``key`` under ``cache_dir``."""
    return Path(cache_dir).expanduser() / f"tokens-{key[:24]}"


class TokenStore:
    """A store's files, memory-mapped read-only: ``store[i]`` is document ``i``'s token ids, a view into the map.

    Opening reads the manifest and the offsets (8 bytes a document) and maps the tokens; nothing else in
    proportion to the corpus is read until documents are indexed.
    """

    def __init__(self, folder: Path, manifest: dict, tokens: np.ndarray, offsets: np.ndarray):
        self.folder = folder
        self.manifest = manifest
        self.tokens = tokens
        self.offsets = offsets
        self._digest: str | None = None

    @classmethod
    def open(cls, folder: str | os.PathLike) -> TokenStore:
        """Map the store in ``folder``; a ``ValueError`` when it is not a complete store of this format."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"'{folder}' is not a token store (no readable {MANIFEST_FILE}: {error})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"token store '{folder}' has format {manifest.get('format_version')}, not {FORMAT_VERSION}")
        dtype = np.dtype(manifest["dtype"])
        # Mapped too: 8 bytes a document (16 MB at 1B tokens) that no process needs to hold.
        offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r")
        size = (folder / TOKENS_FILE).stat().st_size
        if (offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) != manifest["documents"] + 1
                or offsets[0] != 0 or offsets[-1] != manifest["tokens"] or size != manifest["tokens"] * dtype.itemsize):
            raise ValueError(f"token store '{folder}' does not match its manifest (cut short or altered)")
        tokens = np.memmap(folder / TOKENS_FILE, dtype=dtype, mode="r", shape=(manifest["tokens"],))
        return cls(folder, manifest, tokens, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict:
        # A memmap pickles as a copy of its whole content; a store sent to a data-loader worker or another
        # process is sent as its folder and mapped again there.
        return {"folder": str(self.folder)}

    def __setstate__(self, state: dict) -> None:
        other = TokenStore.open(state["folder"])
        self.__dict__.update(other.__dict__)

    def __getitem__(self, index: int) -> np.ndarray:
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"document {index} is out of range for a store of {count} documents")
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document (int64)."""
        return np.diff(self.offsets)

    @property
    def num_tokens(self) -> int:
        """Tokens in the whole store."""
        return int(self.offsets[-1])

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the stored token ids."""
        return self.tokens.dtype

    def digest(self) -> str:
        """SHA-256 of the dtype, the token buffer (read in blocks of ``HASH_BLOCK_BYTES``) and the offsets: changes
        with any token or document boundary. Computed once per open store. The build records the same value in
        the manifest (``manifest["digest"]``) without reading the files again."""
        if self._digest is None:
            hasher = _new_content_hash(self.dtype)
            with open(self.folder / TOKENS_FILE, "rb") as handle:
                while block := handle.read(HASH_BLOCK_BYTES):
                    hasher.update(block)
            hasher.update(self.offsets.tobytes())
            self._digest = hasher.hexdigest()
        return self._digest


class Documents:
    """Several token stores read as one sequence of documents (a training corpus, then a validation corpus):
    ``documents[i]`` is a read-only view of document ``i``'s token ids; nothing is copied."""

    def __init__(self, stores: list[TokenStore]):
        self.stores = list(stores)
        self._starts = np.cumsum([0] + [len(store) for store in self.stores])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        which = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.stores[which][index - int(self._starts[which])]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each document (int64)."""
        return np.concatenate([store.lengths for store in self.stores]) if self.stores else np.zeros(0, np.int64)


def _new_content_hash(dtype: np.dtype):
    hasher = hashlib.sha256()
    hasher.update(f"{np.dtype(dtype).str}\n".encode())
    return hasher


# --- building -------------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _chunk_batch(tokenizer, texts: list[str], max_document_tokens: int, min_document_tokens: int, dtype: np.dtype):
    """One batch's chunks as flat ids and chunk lengths, cut exactly as ``corpus.tokenize_documents`` cuts."""
    # The masks are not needed and cost a tenth of the call; the ids are tokenize_documents' ids.
    encoded = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    lengths = []
    flat: list[int] = []
    for ids in encoded:
        for start in range(0, len(ids), max_document_tokens):
            chunk = ids[start : start + max_document_tokens]
            if len(chunk) >= min_document_tokens:
                flat.extend(chunk)
                lengths.append(len(chunk))
    ids = np.array(flat, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ValueError(f"the tokenizer gave id {int(ids.max())}, outside {dtype}; its len() understates its vocabulary")
    return ids.astype(dtype), np.array(lengths, dtype=np.int64)


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _chunk_in_worker(texts, max_document_tokens, min_document_tokens, dtype):
    return _chunk_batch(_worker_tokenizer, texts, max_document_tokens, min_document_tokens, dtype)


def _write_batch(handle, ids: np.ndarray) -> None:
    handle.write(ids.tobytes())


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


@contextmanager
def _tokenizers_parallelism_off():
    # Forked workers each tokenize their own batches; the fast tokenizer's own thread pool in every one of them
    # would oversubscribe the cores, and it prints a warning in each child when the parent had used it.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _chunked_batches(texts, tokenizer, max_document_tokens, min_document_tokens, num_proc, dtype, batch_size):
    """``(ids, lengths)`` per batch of texts, in the texts' order whatever ``num_proc``; at most two batches per
    worker are in flight, so a generator of texts is read only as fast as it is tokenized."""
    if num_proc <= 1:
        for batch in _batches(texts, batch_size):
            yield _chunk_batch(tokenizer, batch, max_document_tokens, min_document_tokens, dtype)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: workers inherit the tokenizer instead of unpickling (or reloading) it.
    with _tokenizers_parallelism_off(), ProcessPoolExecutor(
        num_proc, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker, initargs=(tokenizer,)
    ) as pool:
        pending = deque()
        try:
            for batch in _batches(texts, batch_size):
                pending.append(pool.submit(_chunk_in_worker, batch, max_document_tokens, min_document_tokens, dtype))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def remove_stale_staging(folder: Path) -> None:
    """Delete the staging folders (``<folder>.<suffix>``) a killed build of ``folder`` left on this host; call it
    with the build lock held."""
    # Called with the build lock held: no other build of this key runs on a host that honours the lock, so any
    # staging folder of this key left here was abandoned by a killed build. A builder on another host (a shared
    # folder without working locks) is left alone while its process cannot be checked.
    host = os.uname().nodename
    for staging in folder.parent.glob(f"{folder.name}.*"):
        if not staging.is_dir():
            continue
        try:
            builder = json.loads((staging / BUILDER_FILE).read_text())
        except (OSError, ValueError):
            builder = {"host": host}
        if builder.get("host") == host:
            shutil.rmtree(staging, ignore_errors=True)


def _check_build_arguments(max_document_tokens: int, min_document_tokens: int, num_proc: int) -> None:
    if max_document_tokens < 1:
        raise InputError(f"max_document_tokens={max_document_tokens} is not valid: it must be >= 1")
    if not 1 <= min_document_tokens <= max_document_tokens:
        raise InputError(
            f"min_document_tokens={min_document_tokens} is not valid: it must be in [1, max_document_tokens={max_document_tokens}]"
        )
    if num_proc < 1:
        raise InputError(f"num_proc={num_proc} is not valid: it must be >= 1")


def _first_text(texts: Iterable[str]) -> Iterator[str]:
    # The first text is looked at before any worker starts: a corpus without one is an input error, not an
    # empty store.
    iterator = iter(texts)
    for text in iterator:
        if text.strip():
            return itertools.chain([text], iterator)
    raise InputError("the corpus has no text: every document is empty; give a corpus with at least one non-empty document")


def build_token_store(
    texts: Iterable[str],
    tokenizer,
    folder: str | os.PathLike,
    *,
    max_document_tokens: int,
    min_document_tokens: int = 2,
    num_proc: int = 1,
    settings: dict,
    batch_size: int = BATCH_TEXTS,
) -> TokenStore:
    """Tokenize ``texts`` (a list or any iterable of strings, read once, in order) into a store at ``folder`` and
    open it.

    Documents are cut as ``corpus.tokenize_documents`` cuts them, by ``num_proc`` worker processes, and written
    batch by batch. The store is written into a staging folder and renamed to ``folder`` (replacing what was
    there) only when complete; a staging folder that a killed build of the same folder left is deleted.
    ``settings`` (JSON values: the source and read settings, e.g. ``read_settings(...)``) go into the manifest
    and, with the tokenizer identity and the chunk lengths, into its key.
    """
    folder = Path(folder).expanduser()
    _check_build_arguments(max_document_tokens, min_document_tokens, num_proc)
    check_writable_directory(folder.parent, "token store folder")
    with build_lock(folder):
        return _build(texts, tokenizer, folder, max_document_tokens, min_document_tokens, num_proc, settings, batch_size)


def _build(texts, tokenizer, folder, max_document_tokens, min_document_tokens, num_proc, settings, batch_size):
    identity = tokenizer_identity(tokenizer)
    dtype = token_dtype(identity["length"])
    settings = _full_settings(settings, max_document_tokens, min_document_tokens)
    texts = _first_text(texts)
    batches = _chunked_batches(texts, tokenizer, max_document_tokens, min_document_tokens, num_proc, dtype, batch_size)
    no_document = (f"the corpus gives no document of at least min_document_tokens={min_document_tokens} tokens; "
                   "valid: a corpus with longer texts or a lower min_document_tokens")
    return _publish(folder, batches, identity, settings, no_document)


def _publish(folder: Path, batches, identity: dict, settings: dict, no_document: str) -> TokenStore:
    """Write ``batches`` (``(flat ids, document lengths)`` pairs, in order) as the store of ``settings`` in
    ``folder``, through a staging folder renamed into place."""
    dtype = token_dtype(identity["length"])
    key = store_key(identity, settings)
    remove_stale_staging(folder)

    def write(staging: Path) -> None:
        (staging / BUILDER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
        hasher = _new_content_hash(dtype)
        lengths = [np.zeros(1, dtype=np.int64)]
        with open(staging / TOKENS_FILE, "wb") as handle:
            for ids, chunk_lengths in batches:
                ids = np.asarray(ids, dtype=dtype)
                _write_batch(handle, ids)
                hasher.update(ids.tobytes())
                lengths.append(np.asarray(chunk_lengths, dtype=np.int64))
            handle.flush()
            os.fsync(handle.fileno())
        offsets = np.cumsum(np.concatenate(lengths), dtype=np.int64)
        if len(offsets) == 1:
            raise InputError(no_document)
        with open(staging / OFFSETS_FILE, "wb") as handle:
            np.save(handle, offsets)
            handle.flush()
            os.fsync(handle.fileno())
        hasher.update(offsets.tobytes())
        manifest = {
            "format_version": FORMAT_VERSION, "key": key, "tokenizer": identity, "dtype": dtype.name,
            "documents": len(offsets) - 1, "tokens": int(offsets[-1]), "digest": hasher.hexdigest(),
            "settings": settings,
        }
        # Written last: a staging folder without it was cut short.
        with open(staging / MANIFEST_FILE, "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        (staging / BUILDER_FILE).unlink()
        fsync_folder(staging)

    publish_folder(folder, write)
    return TokenStore.open(folder)


def write_token_store(batches: Iterable[tuple[np.ndarray, np.ndarray]], tokenizer, folder: str | os.PathLike, *,
                      description: str, max_document_tokens: int) -> TokenStore:
    """A store of documents tokenized elsewhere (by another pipeline, or made up for a benchmark), written to
    ``folder`` and opened; ``data.corpus`` may then name the folder.

    ``batches`` yields ``(ids, lengths)``: the token ids of consecutive documents back to back (by ``tokenizer``'s
    vocabulary) and each one's length; no document may be longer than ``max_document_tokens``. ``description``
    names the source in the manifest.
    """
    folder = Path(folder).expanduser()
    check_writable_directory(folder.parent, "token store folder")
    identity = tokenizer_identity(tokenizer)
    settings = {"corpus": description, "prebuilt": True, "max_document_tokens": int(max_document_tokens)}

    def checked():
        for ids, lengths in batches:
            lengths = np.asarray(lengths, dtype=np.int64)
            if len(lengths) and (lengths.min() < 1 or lengths.max() > max_document_tokens or lengths.sum() != len(ids)):
                raise InputError(f"write_token_store: document lengths must be in [1, max_document_tokens={max_document_tokens}] "
                                 f"and add up to the ids given ({int(lengths.sum())} for {len(ids)} ids)")
            yield ids, lengths

    with build_lock(folder):
        return _publish(folder, checked(), identity, settings, "write_token_store was given no document")


def is_token_store(source: str) -> bool:
    """Whether ``source`` names a token store's folder (one ``write_token_store`` or a build wrote)."""
    path = Path(source).expanduser()
    return path.is_dir() and (path / MANIFEST_FILE).is_file()


def open_prebuilt(source: str, tokenizer, max_document_tokens: int) -> TokenStore:
    """The token store in folder ``source``, checked against ``tokenizer`` and ``max_document_tokens``:
    ``InputError`` when it was made by another tokenizer or holds longer documents."""
    try:
        store = TokenStore.open(source)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"corpus '{source}' is not a complete token store: {error}") from None
    made_by, ours = store.manifest.get("tokenizer") or {}, tokenizer_identity(tokenizer)
    # The ids are what must agree; the same tokenizer may have been loaded from another path.
    if any(made_by.get(field) != ours[field] for field in ("length", "vocabulary_sha256")):
        raise InputError(f"corpus '{source}' is a token store made by tokenizer '{made_by.get('name_or_path')}' "
                         f"({made_by.get('length')} ids), not by this model's '{ours['name_or_path']}' ({ours['length']} ids); "
                         "valid: a store made by the policy's tokenizer")
    longest = store.manifest.get("settings", {}).get("max_document_tokens")
    if longest is None or longest > max_document_tokens:
        raise InputError(f"corpus '{source}' is a token store of documents up to {longest} tokens, longer than "
                         f"max_document_tokens={max_document_tokens}; valid: max_document_tokens >= {longest}")
    return store


def _open_matching(folder: Path, key: str) -> TokenStore | None:
    try:
        store = TokenStore.open(folder)
    except (OSError, ValueError, KeyError):
        return None
    return store if store.manifest.get("key") == key else None


def open_or_build(
    cache_dir: str | os.PathLike,
    tokenizer,
    settings: dict,
    *,
    max_document_tokens: int,
    min_document_tokens: int = 2,
    num_proc: int = 1,
    texts: Iterable[str] | Callable[[], Iterable[str]] | None = None,
) -> TokenStore:
    """The store for ``tokenizer`` and ``settings`` under ``cache_dir``: opened when a complete one with that key
    is there, else built (a folder that holds another key, or a cut-short store, is replaced, never used).

    ``settings`` are ``read_settings(...)``'s; the texts are read with ``iter_texts`` from them, unless ``texts``
    (an iterable, or a function returning one, called only when a build is needed) gives them.
    """
    check_writable_directory(cache_dir, "token store cache folder (cache_dir)")
    _check_build_arguments(max_document_tokens, min_document_tokens, num_proc)
    identity = tokenizer_identity(tokenizer)
    key = store_key(identity, _full_settings(settings, max_document_tokens, min_document_tokens))
    folder = store_folder(cache_dir, key)
    store = _open_matching(folder, key)
    if store is not None:
        return store
    with build_lock(folder):
        store = _open_matching(folder, key)  # built by another process while this one waited
        if store is not None:
            return store
        if texts is None:
            texts = iter_texts(CorpusSource.from_settings(settings), tokenizer)
        elif callable(texts):
            texts = texts()
        return _build(texts, tokenizer, folder, max_document_tokens, min_document_tokens, num_proc, settings, BATCH_TEXTS)


# --- streaming read -------------------------------------------------------------------------------------------


def _stream_records(source: str, split: str, subset: str | None):
    import datasets

    path = Path(source).expanduser()
    try:
        if path.is_file():
            dataset = datasets.load_dataset(_LOCAL_BUILDERS[path.suffix.lower()], data_files={split: str(path)}, split=split, streaming=True)
        else:
            dataset = datasets.load_dataset(source, subset, split=split, streaming=True)
    except Exception as error:
        raise InputError(f"corpus '{source}' cannot be read ({type(error).__name__}: {error})") from None

    def records():
        try:
            yield from dataset
        except Exception as error:
            raise InputError(f"corpus '{source}' cannot be read ({type(error).__name__}: {error})") from None

    return records()


def _limit_tokens(texts: Iterator[str], tokenizer, max_tokens: int) -> Iterator[str]:
    # Texts are kept while their tokens (as the store counts them before chunking) fit max_tokens; counted in
    # small batches so the fast tokenizer works on several at once while little is read past the stop.
    total = 0
    for batch in _batches(texts, _COUNT_BATCH):
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            if total + len(ids) > max_tokens:
                return
            total += len(ids)
            yield text


def iter_texts(source: CorpusSource, tokenizer=None) -> Iterator[str]:
    """Document texts of ``source.corpus`` (the embedded corpus, a local jsonl/json/txt/parquet/csv file or folder, or a
    hub dataset), read with ``datasets`` streaming: nothing past what is kept is downloaded or parsed (beyond the
    reader's own block).

    Records are read as ``corpus.load_texts`` reads them (``text_template`` or ``text_field``, the first
    ``max_documents`` records, empty texts dropped). With ``max_tokens``, texts are kept while their tokens
    (``tokenizer``, no special tokens) add up to at most ``max_tokens``. The source, its fields, that it has a
    text and that ``max_tokens`` holds its first document are checked here, before the iterator is returned.
    """
    max_documents, max_tokens, text_field, text_template = (source.max_documents, source.max_tokens,
                                                             source.text_field, source.text_template)
    split, subset, embedded_documents, seed, source = (source.split, source.subset, source.embedded_documents,
                                                       source.seed, source.corpus)
    if max_documents is not None and max_documents < 1:
        raise InputError(f"max_documents={max_documents} is not valid: it must be >= 1 (or None: all)")
    if max_tokens is not None:
        if max_tokens < 1:
            raise InputError(f"max_tokens={max_tokens} is not valid: it must be >= 1 (or None: all)")
        if tokenizer is None:
            raise InputError("max_tokens needs the tokenizer that counts the tokens")
    needed = template_fields(text_template) if text_template else [text_field]

    if source == EMBEDDED_CORPUS:
        from .mathgen import generate_math_corpus

        count = embedded_documents if max_documents is None else min(embedded_documents, max_documents)
        texts: Iterator[str] = iter(generate_math_corpus(count, seed=seed))
    else:
        check_corpus_source(source)
        records = _stream_records(source, split, subset)
        first = next(records, None)
        if first is None:
            raise InputError(f"corpus '{source}' is empty: it holds no record")
        missing = [name for name in needed if name not in first]
        if missing:
            raise InputError(f"corpus '{source}' has no field {missing}; its fields are {sorted(first)}")
        records = itertools.chain([first], records)
        if max_documents is not None:
            records = itertools.islice(records, max_documents)
        if text_template:
            texts = (text_template.format_map({name: row[name] for name in needed}) for row in records)
        else:
            texts = (str(row[text_field]) for row in records)
        texts = (text for text in texts if text.strip())

    first_text = next(texts, None)
    if first_text is None:
        raise InputError(f"corpus '{source}' is empty: no record has text in {needed}")
    texts = itertools.chain([first_text], texts)
    if max_tokens is not None:
        first_tokens = len(tokenizer(first_text, add_special_tokens=False)["input_ids"])
        if first_tokens > max_tokens:
            raise InputError(
                f"max_tokens={max_tokens} is below the first document of corpus '{source}', which has {first_tokens} "
                f"tokens; valid: at least {first_tokens} (or None: all)"
            )
        texts = _limit_tokens(texts, tokenizer, max_tokens)
    return texts
