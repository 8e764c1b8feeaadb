"""Tests for the memory-mapped token store: ids as ``tokenize_documents`` gives them, dtype choice, parallel builds
equal to serial ones, atomic publishing, keyed reuse, the content digest, the streaming read and bad input."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from rmt_lightning.runtime.errors import InputError
from rmt_lightning.data import token_store as ts
from rmt_lightning.data.corpus import load_texts, tokenize_documents
from rmt_lightning.data.mathgen import generate_math_corpus

MAX_DOCUMENT_TOKENS = 24

TEXTS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?\n3 + 5 = 8\n#### 8",
    "",  # an empty text gives no document
    "Zoë paid 12 € for 3 crêpes at the café; naïve façade, 日本語, emoji 🙂🍎 and ℵ₀.",
    "hi",  # fewer tokens than min_document_tokens once cut: dropped
    " ".join(f"Step {i}: multiply {i} by {i + 1} to get {i * (i + 1)}." for i in range(12)),  # many chunks
    "Ana reads 20 pages a day for 7 days.\n20 * 7 = 140\n#### 140",
]


def as_lists(store: ts.TokenStore) -> list[list[int]]:
    return [store[i].tolist() for i in range(len(store))]


def build(texts, tokenizer, folder, **kwargs) -> ts.TokenStore:
    options = {"max_document_tokens": MAX_DOCUMENT_TOKENS, "min_document_tokens": 3, "settings": {"corpus": "test"}}
    return ts.build_token_store(texts, tokenizer, folder, **{**options, **kwargs})


def staging_folders(folder: Path) -> list[Path]:
    return [p for p in folder.parent.glob(f"{folder.name}.*") if p.is_dir()]


class WideTokenizer:
    """The tiny tokenizer, claiming a vocabulary of 70,000 tokens (too many for uint16)."""

    def __init__(self, inner):
        self.inner = inner
        self.name_or_path = inner.name_or_path
        self.backend_tokenizer = inner.backend_tokenizer

    def __len__(self):
        return 70_000

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


# ---- round trip and layout ---------------------------------------------------------------------------


def test_store_round_trip_equals_tokenize_documents(tokenizer, tmp_path):
    expected = tokenize_documents(TEXTS, tokenizer, MAX_DOCUMENT_TOKENS, min_document_tokens=3)
    assert len(tokenizer(TEXTS[4], add_special_tokens=False)["input_ids"]) > 3 * MAX_DOCUMENT_TOKENS
    store = build(iter(TEXTS), tokenizer, tmp_path / "store", batch_size=2)  # a generator, several batches

    assert as_lists(store) == expected
    assert len(store) == len(expected)
    assert store.lengths.dtype == np.int64 and store.lengths.tolist() == [len(d) for d in expected]
    assert store.num_tokens == sum(map(len, expected))
    assert store.dtype == np.uint16
    assert store[-1].tolist() == expected[-1]
    with pytest.raises(IndexError):
        store[len(store)]
    # Documents are read-only views into the mapped file, not copies.
    assert isinstance(store.tokens, np.memmap) and np.shares_memory(store[1], store.tokens)
    with pytest.raises(ValueError):
        store[0][0] = 1

    # Sent to another process as its folder, not as a copy of its tokens.
    assert len(pickle.dumps(store)) < 500
    assert as_lists(pickle.loads(pickle.dumps(store))) == expected

    folder = tmp_path / "store"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "offsets.npy", "tokens.bin"]
    assert (folder / "tokens.bin").stat().st_size == 2 * store.num_tokens
    offsets = np.load(folder / "offsets.npy")
    assert offsets.dtype == np.int64 and offsets[0] == 0 and len(offsets) == len(expected) + 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == store.manifest
    assert manifest["documents"] == len(expected) and manifest["tokens"] == store.num_tokens
    assert manifest["dtype"] == "uint16" and manifest["format_version"] == ts.FORMAT_VERSION
    assert manifest["tokenizer"] == ts.tokenizer_identity(tokenizer)
    assert manifest["tokenizer"]["length"] == len(tokenizer) and manifest["tokenizer"]["class"] == type(tokenizer).__name__
    assert manifest["settings"] == {"corpus": "test", "max_document_tokens": MAX_DOCUMENT_TOKENS, "min_document_tokens": 3}
    assert manifest["key"] == ts.store_key(manifest["tokenizer"], manifest["settings"])


def test_dtype_is_the_smallest_that_holds_the_vocabulary(tokenizer, tmp_path):
    assert ts.token_dtype(512) == np.uint16 and ts.token_dtype(65_536) == np.uint16
    assert ts.token_dtype(65_537) == np.uint32 and ts.token_dtype(1 << 32) == np.uint32
    with pytest.raises(InputError, match="does not fit"):
        ts.token_dtype((1 << 32) + 1)

    narrow = build(TEXTS, tokenizer, tmp_path / "narrow")
    wide = build(TEXTS, WideTokenizer(tokenizer), tmp_path / "wide")
    assert wide.dtype == np.uint32 and wide.manifest["dtype"] == "uint32"
    assert (tmp_path / "wide" / "tokens.bin").stat().st_size == 4 * wide.num_tokens
    assert as_lists(wide) == as_lists(narrow)
    assert wide.manifest["key"] != narrow.manifest["key"]


def test_two_processes_build_the_same_bytes_as_one(tokenizer, tmp_path):
    texts = generate_math_corpus(150, seed=3) + TEXTS
    one = build(texts, tokenizer, tmp_path / "one", num_proc=1, batch_size=7)
    two = build(iter(texts), tokenizer, tmp_path / "two", num_proc=2, batch_size=7)
    for name in ("tokens.bin", "offsets.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one.manifest == two.manifest
    assert as_lists(two) == tokenize_documents(texts, tokenizer, MAX_DOCUMENT_TOKENS, min_document_tokens=3)


# ---- atomic build ------------------------------------------------------------------------------------


def test_a_build_that_fails_midway_leaves_no_store_and_the_next_succeeds(tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "store"
    real_write = ts._write_batch
    writes = []

    def write_then_fail(handle, ids):
        if writes:
            raise OSError("disk full")
        writes.append(len(ids))
        real_write(handle, ids)

    monkeypatch.setattr(ts, "_write_batch", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        build(TEXTS, tokenizer, folder, batch_size=2)
    assert writes and not folder.exists() and staging_folders(folder) == []

    monkeypatch.setattr(ts, "_write_batch", real_write)
    store = build(TEXTS, tokenizer, folder, batch_size=2)
    assert as_lists(store) == tokenize_documents(TEXTS, tokenizer, MAX_DOCUMENT_TOKENS, min_document_tokens=3)


def _build_until_killed(tokenizer, folder: Path, flag: Path) -> None:
    def texts():
        for i in range(10):
            yield f"Document {i} has some words in it."
        flag.write_text("two batches written, the third being read")
        time.sleep(60)
        yield "never"

    build(texts(), tokenizer, folder, batch_size=4)


def test_a_killed_build_leaves_no_store_and_the_next_build_replaces_its_staging_folder(tokenizer, tmp_path):
    folder, flag = tmp_path / "store", tmp_path / "flag"
    # Forked: the child starts at once with the tokenizer loaded, and SIGKILL gives it no chance to clean up.
    child = multiprocessing.get_context("fork").Process(target=_build_until_killed, args=(tokenizer, folder, flag))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert flag.exists(), "the build did not start"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert not folder.exists()
    [stale] = staging_folders(folder)
    assert (stale / "tokens.bin").exists() and not (stale / "manifest.json").exists()

    store = build(TEXTS, tokenizer, folder)
    assert staging_folders(folder) == []
    assert as_lists(store) == tokenize_documents(TEXTS, tokenizer, MAX_DOCUMENT_TOKENS, min_document_tokens=3)


# ---- keyed reuse -------------------------------------------------------------------------------------


def test_open_or_build_reuses_its_own_store_and_rebuilds_for_other_settings(tokenizer, tmp_path):
    calls = []

    def texts(subset):
        def read():
            calls.append(subset)
            return TEXTS if subset == "a" else TEXTS[:3]
        return read

    def store_for(subset, tok=tokenizer, max_document_tokens=MAX_DOCUMENT_TOKENS):
        settings = ts.read_settings(ts.CorpusSource("some/hub-corpus", subset=subset))
        return ts.open_or_build(tmp_path, tok, settings, max_document_tokens=max_document_tokens, texts=texts(subset))

    first = store_for("a")
    again = store_for("a")
    assert calls == ["a"] and again.folder == first.folder and as_lists(again) == as_lists(first)

    other = store_for("b")
    assert calls == ["a", "b"] and other.folder != first.folder
    assert as_lists(other) == tokenize_documents(TEXTS[:3], tokenizer, MAX_DOCUMENT_TOKENS)
    assert as_lists(store_for("a")) == as_lists(first) and calls == ["a", "b"]  # "b" did not replace "a"

    # Another chunk length and another tokenizer each have their own store.
    assert store_for("a", max_document_tokens=16).folder not in (first.folder, other.folder)
    assert store_for("a", tok=WideTokenizer(tokenizer)).dtype == np.uint32
    assert calls == ["a", "b", "a", "a"]


def test_a_folder_holding_another_key_or_a_cut_short_store_is_rebuilt_not_used(tokenizer, tmp_path):
    settings = ts.read_settings(ts.CorpusSource("some/hub-corpus"))
    built = ts.open_or_build(tmp_path, tokenizer, settings, max_document_tokens=MAX_DOCUMENT_TOKENS, texts=TEXTS)
    expected = as_lists(built)
    manifest_path = built.folder / "manifest.json"

    # A store of other settings under this folder's name (e.g. copied in by hand) is not opened as this one.
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "key": "0" * 64}))
    rebuilt = ts.open_or_build(tmp_path, tokenizer, settings, max_document_tokens=MAX_DOCUMENT_TOKENS, texts=TEXTS[:1])
    assert rebuilt.manifest["key"] == manifest["key"]
    assert as_lists(rebuilt) == tokenize_documents(TEXTS[:1], tokenizer, MAX_DOCUMENT_TOKENS)

    # A cut-short token file fails to open and is rebuilt.
    with open(rebuilt.folder / "tokens.bin", "r+b") as handle:
        handle.truncate(2)
    with pytest.raises(ValueError, match="does not match its manifest"):
        ts.TokenStore.open(rebuilt.folder)
    again = ts.open_or_build(tmp_path, tokenizer, settings, max_document_tokens=MAX_DOCUMENT_TOKENS, texts=TEXTS)
    assert as_lists(again) == expected


def test_a_local_corpus_edited_in_place_gets_another_key(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one"}\n')
    before = ts.read_settings(ts.CorpusSource(str(corpus)))
    corpus.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert ts.read_settings(ts.CorpusSource(str(corpus))) != before
    # The embedded corpus's size and seed are part of its settings; a hub corpus ignores them.
    assert ts.read_settings(ts.CorpusSource("embedded:math", seed=1)) != ts.read_settings(ts.CorpusSource("embedded:math", seed=2))
    assert ts.read_settings(ts.CorpusSource("org/corpus", seed=1)) == ts.read_settings(ts.CorpusSource("org/corpus", seed=2))


# ---- digest ------------------------------------------------------------------------------------------


def test_digest_reads_the_content_and_changes_with_a_token_or_a_boundary(tokenizer, tmp_path, monkeypatch):
    store = build(TEXTS, tokenizer, tmp_path / "store")
    monkeypatch.setattr(ts, "HASH_BLOCK_BYTES", 16)  # many blocks: the result does not depend on the block size
    digest = store.digest()
    assert digest == store.manifest["digest"]
    assert ts.TokenStore.open(tmp_path / "store").digest() == digest

    tokens = np.memmap(tmp_path / "store" / "tokens.bin", dtype=np.uint16, mode="r+")
    tokens[5] += 1
    tokens.flush()
    del tokens
    assert ts.TokenStore.open(tmp_path / "store").digest() != digest

    rebuilt = build(TEXTS, tokenizer, tmp_path / "store")
    assert rebuilt.digest() == digest
    offsets = np.load(tmp_path / "store" / "offsets.npy")
    offsets[1] += 1  # same tokens, one boundary moved
    np.save(tmp_path / "store" / "offsets.npy", offsets)
    assert ts.TokenStore.open(tmp_path / "store").digest() != digest


# ---- streaming read ----------------------------------------------------------------------------------


def test_streaming_jsonl_reads_as_load_texts(tmp_path):
    records = [{"q": f"Question {i} é?", "a": f"#### {i}", "text": "" if i == 2 else f"doc {i}"} for i in range(8)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    for kwargs in ({}, {"max_documents": 4}, {"text_template": "{q}\n{a}", "max_documents": 3}):
        assert list(ts.iter_texts(ts.CorpusSource(str(corpus), **kwargs))) == load_texts(str(corpus), **kwargs)


def test_streaming_read_with_max_tokens_stops_early_and_reads_no_further(tokenizer, tmp_path):
    from datasets.packaged_modules.json.json import JsonConfig

    # Valid records past the json reader's first block, then a line that cannot be parsed: reading the whole
    # file fails, so a read that succeeds stopped before the end.
    corpus = tmp_path / "huge.jsonl"
    line = json.dumps({"text": "Mia buys 4 pens at 3 dollars each. 4 * 3 = 12 #### 12"}) + "\n"
    with open(corpus, "w") as handle:
        handle.write(line * (JsonConfig.chunksize // len(line) + 1000))
        handle.write("{not json\n")
    with pytest.raises(InputError, match="cannot be read"):
        for _ in ts.iter_texts(ts.CorpusSource(str(corpus))):
            pass

    per_document = len(tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
    texts = ts.iter_texts(ts.CorpusSource(str(corpus), max_tokens=10 * per_document + per_document // 2), tokenizer)
    assert len(list(texts)) == 10

    # The same path into a store: at most max_tokens tokens, keyed on max_tokens.
    settings = ts.read_settings(ts.CorpusSource(str(corpus), max_tokens=5 * per_document))
    store = ts.open_or_build(tmp_path / "cache", tokenizer, settings, max_document_tokens=256)
    assert len(store) == 5 and store.num_tokens == 5 * per_document
    assert store.manifest["settings"]["max_tokens"] == 5 * per_document


def test_embedded_corpus_streams_from_the_generator(tokenizer):
    texts = list(ts.iter_texts(ts.CorpusSource("embedded:math", embedded_documents=30, seed=4)))
    assert texts == generate_math_corpus(30, seed=4)
    limit = sum(len(ids) for ids in tokenizer(texts[:3], add_special_tokens=False)["input_ids"])
    assert list(ts.iter_texts(ts.CorpusSource("embedded:math", max_tokens=limit, embedded_documents=30, seed=4), tokenizer)) == texts[:3]


# ---- bad input ---------------------------------------------------------------------------------------


def test_a_corpus_with_no_text_is_an_input_error(tokenizer, tmp_path):
    with pytest.raises(InputError, match="no text"):
        build(["", "  \n"], tokenizer, tmp_path / "store")
    assert not (tmp_path / "store").exists()
    corpus = tmp_path / "blank.jsonl"
    corpus.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(InputError, match=r"corpus '.*blank.jsonl' is empty: no record has text in \['text'\]"):
        ts.iter_texts(ts.CorpusSource(str(corpus)))
    with pytest.raises(InputError, match=r"has no field \['body'\]; its fields are \['text'\]"):
        ts.iter_texts(ts.CorpusSource(str(corpus), text_field="body"))
    with pytest.raises(InputError, match="no document of at least min_document_tokens=3"):
        build(["hi", "a"], tokenizer, tmp_path / "store")


def test_max_tokens_below_the_first_document_names_its_length(tokenizer, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    first = len(tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"])
    with pytest.raises(InputError, match=rf"max_tokens=5 is below the first document .* which has {first} tokens; valid: at least {first}"):
        ts.iter_texts(ts.CorpusSource(str(corpus), max_tokens=5), tokenizer)
    # Raised by open_or_build before anything is written.
    with pytest.raises(InputError, match="max_tokens=5"):
        ts.open_or_build(tmp_path / "cache", tokenizer, ts.read_settings(ts.CorpusSource(str(corpus), max_tokens=5)), max_document_tokens=64)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []


def test_a_cache_folder_that_cannot_be_written_is_an_input_error(tokenizer, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cache folder .*a-file/tokens' cannot be created: .* is a file"):
        ts.open_or_build(blocker / "tokens", tokenizer, ts.read_settings(ts.CorpusSource("org/corpus")), max_document_tokens=64, texts=TEXTS)
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(InputError, match="not writable"):
            ts.open_or_build(locked, tokenizer, ts.read_settings(ts.CorpusSource("org/corpus")), max_document_tokens=64, texts=TEXTS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_document_tokens": 0}, "max_document_tokens=0"),
        ({"min_document_tokens": 0}, r"min_document_tokens=0 is not valid: it must be in \[1, max_document_tokens=24\]"),
        ({"num_proc": 0}, "num_proc=0"),
    ],
)
def test_bad_build_settings_are_input_errors(tokenizer, tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        build(TEXTS, tokenizer, tmp_path / "store", **kwargs)


def test_a_store_tokenized_elsewhere_is_a_corpus_when_its_tokenizer_matches(tokenizer, tmp_path):
    """``write_token_store`` writes ids from another pipeline as a store; ``data.corpus`` may name its folder. A
    store of another tokenizer or of longer documents is refused with the fix."""
    from rmt_lightning.data.datamodule import RMTDataModule
    from rmt_lightning.engine.models import BUILTIN_TINY

    documents = [np.arange(3, 3 + n) for n in (5, 9, 2, 7)]
    batches = [(np.concatenate(documents[:2]), [5, 9]), (np.concatenate(documents[2:]), [2, 7])]
    store = ts.write_token_store(iter(batches), tokenizer, tmp_path / "ids", description="elsewhere", max_document_tokens=9)
    assert as_lists(store) == [d.tolist() for d in documents] and store.dtype == np.uint16
    assert ts.is_token_store(str(store.folder)) and not ts.is_token_store(str(tmp_path))

    def datamodule(**kwargs):
        return RMTDataModule(corpus=str(store.folder), model_name_or_path=BUILTIN_TINY, val_documents=1,
                             cache_dir=str(tmp_path / "cache"), **kwargs)

    assert as_lists(datamodule(max_document_tokens=16)._load_documents()) == as_lists(store)
    with pytest.raises(InputError, match="documents up to 9 tokens, longer than max_document_tokens=8"):
        datamodule(max_document_tokens=8)._load_documents()
    other = dict(store.manifest)
    other["tokenizer"] = {**other["tokenizer"], "vocabulary_sha256": "0" * 16}
    (store.folder / ts.MANIFEST_FILE).write_text(json.dumps(other))
    with pytest.raises(InputError, match="not by this model's"):
        datamodule(max_document_tokens=16)._load_documents()
    with pytest.raises(InputError, match=r"lengths must be in \[1, max_document_tokens=4\]"):
        ts.write_token_store(iter(batches), tokenizer, tmp_path / "long", description="x", max_document_tokens=4)
    assert not (tmp_path / "long").exists()
