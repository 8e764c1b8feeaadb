"""Load a corpus as document texts and tokenize it into documents."""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

from ..runtime.errors import InputError, names_a_local_path

EMBEDDED_CORPUS = "embedded:math"
"""Name of the project's own corpus: generated GSM8K-style word problems (see ``data/mathgen.py``)."""

_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def _is_local(source: str) -> bool:
    # The project's one path-or-hub-id rule, and a data file's suffix also means a local file.
    return names_a_local_path(source) or Path(source).suffix.lower() in _LOCAL_BUILDERS


def check_corpus_source(source: str, field: str = "corpus") -> None:
    """A local corpus exists, has a known suffix and is not empty; the embedded corpus and hub names pass
    (``datasets`` reports those). Reads at most the file's first bytes."""
    if source == EMBEDDED_CORPUS or not _is_local(source):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"{field} '{source}' does not exist; give a .jsonl/.json/.txt/.parquet/.csv file, a hub dataset or '{EMBEDDED_CORPUS}'")
    if path.is_file():
        if path.suffix.lower() not in _LOCAL_BUILDERS:
            raise InputError(f"{field} file '{source}' has suffix '{path.suffix}'; valid: {sorted(_LOCAL_BUILDERS)}")
        with open(path, "rb") as handle:
            if not handle.read(1 << 16).strip():
                raise InputError(f"{field} '{source}' is empty: it holds no document")


def template_fields(template: str) -> list[str]:
    """Field names a ``str.format`` template reads; only plain names are allowed (no attribute or index access)."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise InputError(f"text_template field '{{{name}}}' is not a plain field name like '{{question}}'")
        fields.append(name)
    if not fields:
        raise InputError(f"text_template '{template}' names no field; write e.g. '{{question}}\\n{{answer}}'")
    return fields


def load_texts(
    source: str,
    split: str = "train",
    text_field: str = "text",
    text_template: str | None = None,
    max_documents: int | None = None,
    subset: str | None = None,
    embedded_documents: int = 2000,
    seed: int = 0,
) -> list[str]:
    """Document texts from the embedded corpus, a local jsonl/json/txt/parquet/csv file or folder, or a hub dataset.

    ``text_template`` (e.g. ``"{question}\\n{answer}"``) joins several fields of a record; otherwise
    ``text_field`` is read. Empty texts are dropped. The first ``max_documents`` are kept.
    """
    if source == EMBEDDED_CORPUS:
        from .mathgen import generate_math_corpus

        count = embedded_documents if max_documents is None else min(embedded_documents, max_documents)
        return generate_math_corpus(count, seed=seed)

    import datasets

    path = Path(source)
    check_corpus_source(source)
    try:
        if path.is_file():
            dataset = datasets.load_dataset(_LOCAL_BUILDERS[path.suffix.lower()], data_files={split: str(path)}, split=split)
        else:
            dataset = datasets.load_dataset(source, subset, split=split)
    except Exception as error:
        raise InputError(f"corpus '{source}' cannot be read ({type(error).__name__}: {error})") from None

    columns = set(dataset.column_names)
    needed = template_fields(text_template) if text_template else [text_field]
    missing = [name for name in needed if name not in columns]
    if missing:
        raise InputError(f"corpus '{source}' has no field {missing}; its fields are {sorted(columns)}")
    if max_documents is not None:
        dataset = dataset.select(range(min(max_documents, len(dataset))))
    if text_template:
        texts = [text_template.format_map({name: row[name] for name in needed}) for row in dataset]
    else:
        texts = [str(row) for row in dataset[text_field]]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise InputError(f"corpus '{source}' is empty: no record has text in {needed}")
    return texts


def tokenize_documents(texts: Sequence[str], tokenizer, max_document_tokens: int, min_document_tokens: int = 2) -> list[list[int]]:
    """Token ids per document, long documents split into chunks of at most ``max_document_tokens``.

    No BOS/EOS is added: positions are scored and predicted inside the text itself. Chunks shorter than
    ``min_document_tokens`` carry no prediction and are dropped.
    """
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    documents = []
    for ids in encoded:
        for start in range(0, len(ids), max_document_tokens):
            chunk = ids[start : start + max_document_tokens]
            if len(chunk) >= min_document_tokens:
                documents.append(chunk)
    return documents
