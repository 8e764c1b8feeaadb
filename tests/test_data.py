"""Tests for the data pipeline: corpus loading, token bytes, entropy scoring, score cache and RMTDataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rmt_lightning.data.corpus import load_texts, tokenize_documents
from rmt_lightning.data.datamodule import RMTDataModule
from rmt_lightning.data.scoring import score_entropy, window_plan
from rmt_lightning.method import assign_tiers
from rmt_lightning.engine.models import BUILTIN_TINY
from rmt_lightning.engine.tokens import TokenBytes

GSM8K_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k"


# ---- shared fixtures and helpers ---------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def random_document(length: int, seed: int) -> list[int]:
    # Ids 3.. avoid the tokenizer's special tokens.
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_entropies(model, tokens: list[int], top_k: int | None = None) -> torch.Tensor:
    """Entropy of each next-token prediction from one plain forward over ``tokens``: row i predicts token i + 1."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    if top_k is not None:
        logits = logits.topk(top_k, dim=-1).values
    return torch.distributions.Categorical(logits=logits).entropy()


# ---- load_texts --------------------------------------------------------------------------------------


QA = [{"question": "What is 2 + 3?", "answer": "5"}, {"question": "Name a colour.", "answer": "red"}, {"question": "Q3", "answer": "A3"}]


def test_load_texts_jsonl_text_field_drops_empty(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "first doc"}, {"text": "   "}, {"text": "third doc"}])
    assert load_texts(str(path)) == ["first doc", "third doc"]


def test_load_texts_jsonl_template_joins_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    texts = load_texts(str(path), text_template="{question}\n{answer}")
    assert texts == ["What is 2 + 3?\n5", "Name a colour.\nred", "Q3\nA3"]


def test_load_texts_txt_one_document_per_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("line one\n\nline two\n")
    assert load_texts(str(path)) == ["line one", "line two"]


def test_load_texts_parquet(tmp_path):
    import datasets

    path = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": ["alpha", "beta", "gamma"], "id": [1, 2, 3]}).to_parquet(str(path))
    assert load_texts(str(path), text_field="body") == ["alpha", "beta", "gamma"]


def test_load_texts_max_documents_keeps_the_first(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    assert load_texts(str(path), text_template="{answer}", max_documents=2) == ["5", "red"]


def test_load_texts_missing_field_names_it_and_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(ValueError, match="body") as error:
        load_texts(str(path), text_field="body")
    assert "answer" in str(error.value) and "question" in str(error.value)
    with pytest.raises(ValueError, match="solution"):
        load_texts(str(path), text_template="{question} {solution}")


@pytest.mark.parametrize("template", ["{a.b}", "{a[0]}", "{0}", "no fields at all"])
def test_load_texts_bad_template_raises(tmp_path, template):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"a": "x", "question": "q"}])
    with pytest.raises(ValueError, match="text_template"):
        load_texts(str(path), text_template=template)


def test_load_texts_unknown_suffix_raises(tmp_path):
    path = tmp_path / "corpus.xml"
    path.write_text("<doc>hi</doc>")
    with pytest.raises(ValueError, match=r"suffix '\.xml'"):
        load_texts(str(path))


def test_load_texts_embedded_math_is_deterministic():
    texts = load_texts("embedded:math", embedded_documents=7)
    assert len(texts) == 7 and all(isinstance(t, str) and t.strip() for t in texts)
    assert load_texts("embedded:math", embedded_documents=7) == texts
    assert load_texts("embedded:math", embedded_documents=7, max_documents=3) == texts[:3]
    assert load_texts("embedded:math", embedded_documents=7, seed=1) != texts


def test_load_texts_gsm8k_with_template():
    test_file = GSM8K_DIR / "test.jsonl"
    if not test_file.exists():
        pytest.skip(f"no GSM8K copy at {GSM8K_DIR}")
    texts = load_texts(str(test_file), text_template="{question}\n{answer}", max_documents=5)
    with open(test_file) as handle:
        records = [json.loads(next(handle)) for _ in range(5)]
    assert texts == [f"{r['question']}\n{r['answer']}" for r in records]
    assert all("####" in text for text in texts)


# ---- tokenize_documents ------------------------------------------------------------------------------


def test_tokenize_documents_chunks_cover_text_in_order(tokenizer):
    texts = [" ".join(str(i) for i in range(1, 60)), "Tom has 3 apples and buys 4 more."]
    full = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    chunks = tokenize_documents(texts, tokenizer, max_document_tokens=7, min_document_tokens=1)
    assert all(1 <= len(c) <= 7 for c in chunks)
    assert [token for chunk in chunks for token in chunk] == full[0] + full[1]
    assert sum(len(c) == 7 for c in chunks) >= len(chunks) - 2  # only each document's last chunk may be short


def test_tokenize_documents_drops_short_chunks(tokenizer):
    text = " ".join(str(i) for i in range(1, 60))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    size = len(ids) - 1  # one full chunk and a 1-token tail
    one_token = "7"
    assert len(tokenizer(one_token, add_special_tokens=False)["input_ids"]) == 1
    chunks = tokenize_documents([text, one_token], tokenizer, max_document_tokens=size, min_document_tokens=2)
    assert chunks == [ids[:size]]


# ---- TokenBytes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sentence", ["café 日本 72", " leading space", "  two spaces\tand a tab\nnewline", "#### 1234"])
def test_token_bytes_concatenate_to_utf8(tokenizer, sentence):
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.byte_level
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes.many(ids)) == sentence.encode("utf-8")


def test_token_bytes_keep_leading_space(tokenizer):
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer("1 2", add_special_tokens=False)["input_ids"]
    assert token_bytes.many(ids) == [b"1", b" 2"]


# ---- window_plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,window,stride", [(1, 8, 4), (5, 8, 4), (8, 8, 4), (9, 8, 4), (40, 16, 8), (41, 16, 8), (100, 10, 3), (30, 4, 3)])
def test_window_plan_owns_every_target_once(length, window, stride):
    plan = window_plan(length, window, stride)
    owned = [t for start, end, first in plan for t in range(first, end)]
    assert sorted(owned) == list(range(1, length))
    assert all(end - start <= window and start < first for start, end, first in plan)


@pytest.mark.parametrize("stride", [0, -1, 16, 17])
def test_window_plan_rejects_bad_stride(stride):
    with pytest.raises(ValueError, match="stride"):
        window_plan(40, 16, stride)


# ---- score_entropy -----------------------------------------------------------------------------------


def test_score_entropy_short_documents_match_full_forward(model):
    documents = [random_document(n, seed=n) for n in (2, 5, 9, 20)]
    scores = score_entropy(model, documents, window=32, stride=16, batch_size=4)
    for doc, score in zip(documents, scores):
        assert score.shape == (len(doc),) and torch.isnan(score[0])
        torch.testing.assert_close(score[1:], reference_entropies(model, doc)[:-1], atol=1e-4, rtol=0)


def test_score_entropy_long_document_uses_owning_window(model):
    doc = random_document(40, seed=7)
    score = score_entropy(model, [doc], window=16, stride=8)[0]
    windows = [(0, 16), (8, 24), (16, 32), (24, 40)]  # start += stride until the window reaches the end
    per_window = {start: reference_entropies(model, doc[start:end]) for start, end in windows}
    assert torch.isnan(score[0])
    for p in range(1, 40):
        # Owner: the window holding p with the most context before it (the earliest one).
        start = min(s for s, e in windows if s < p < e)
        assert score[p].item() == pytest.approx(per_window[start][p - start - 1].item(), abs=1e-4), p
    full = reference_entropies(model, doc)
    assert not torch.allclose(score[24:], full[23:-1], atol=1e-6)  # truncated context really differs


def test_score_entropy_top_k(model):
    documents = [random_document(12, seed=1), random_document(6, seed=2)]
    scores = score_entropy(model, documents, window=32, stride=16, top_k=16)
    for doc, score in zip(documents, scores):
        torch.testing.assert_close(score[1:], reference_entropies(model, doc, top_k=16)[:-1], atol=1e-4, rtol=0)
    assert all((s[1:] <= torch.log(torch.tensor(16.0)) + 1e-5).all() for s in scores)


def test_score_entropy_batching_does_not_change_scores(model):
    documents = [random_document(n, seed=n) for n in (3, 17, 9, 30, 5, 12, 2)]
    one = score_entropy(model, documents, window=16, stride=8, batch_size=1)
    four = score_entropy(model, documents, window=16, stride=8, batch_size=4, pad_token_id=0)
    for a, b in zip(one, four):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, equal_nan=True)
        assert not torch.isnan(a[1:]).any()


# ---- RMTDataModule -----------------------------------------------------------------------------------


COUNTS = list(range(5, 45))  # 40 documents "1 2 ... n"
VAL_DOCUMENTS = 8


def counting_text(n: int) -> str:
    return " ".join(str(i) for i in range(1, n + 1))


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "counting.jsonl", [{"text": counting_text(n)} for n in COUNTS])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("entropy-cache")


@pytest.fixture(scope="module")
def thresholds(tokenizer, model) -> tuple[float, float, float]:
    """Quartiles of the corpus's entropies, so all three tiers and the non-candidates are populated."""
    documents = [tokenizer(counting_text(n), add_special_tokens=False)["input_ids"] for n in COUNTS]
    entropy = torch.cat([s[1:] for s in score_entropy(model, documents, window=64, stride=32)])
    return tuple(float(q) for q in torch.quantile(entropy, torch.tensor([0.25, 0.5, 0.75])))


@pytest.fixture
def make_dm(corpus_file, cache_dir, thresholds):
    def make(**overrides) -> RMTDataModule:
        kwargs = dict(
            corpus=str(corpus_file), model_name_or_path=BUILTIN_TINY, val_documents=VAL_DOCUMENTS, max_document_tokens=64,
            scoring_window=64, scoring_stride=32, scoring_batch_size=4, cache_dir=str(cache_dir), tier_thresholds=thresholds,
            batch_size=8, batches_per_epoch=5, max_context_tokens=6, continuation_tokens=3, seed=0,
        )
        kwargs.update(overrides)
        return RMTDataModule(**kwargs)

    return make


@pytest.fixture
def ready_dm(make_dm) -> RMTDataModule:
    dm = make_dm()
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_documents_and_split(ready_dm, tokenizer):
    dm = ready_dm
    assert [doc.tolist() for doc in dm.documents] == [tokenizer(counting_text(n), add_special_tokens=False)["input_ids"] for n in COUNTS]
    val_docs = set(dm.val_candidates.doc.tolist())
    assert len(val_docs) == VAL_DOCUMENTS and set(dm.train_index.held_out) == val_docs
    candidate_docs = {int(d) for t in range(3) for d in dm.train_index.tier_positions(t)[0]}
    assert candidate_docs and candidate_docs.isdisjoint(val_docs) and candidate_docs <= set(range(len(COUNTS)))


def test_the_tier_index_holds_what_the_in_memory_candidates_table_held(ready_dm, cache_dir, thresholds):
    """The mapped index equals ``Candidates.from_scores`` over the same shards: every tier's (document, position)
    pairs in order, and their entropies."""
    from rmt_lightning.data.batches import Candidates
    from rmt_lightning.data.entropy_shards import load_shards

    dm = ready_dm
    training = dm.train_index.store
    key = dm.train_index.manifest["scores_key"]
    scores = load_shards(cache_dir / f"entropy-{key[:24]}", key, training.lengths.tolist())
    held_out = set(dm.train_index.held_out)
    reference = Candidates.from_scores(scores, [d for d in range(len(training)) if d not in held_out], thresholds)
    members = reference.tier_members()
    assert dm.train_index.sizes.tolist() == [len(m) for m in members]
    for tier, ids in enumerate(members):
        documents, positions = dm.train_index.tier_positions(tier)
        assert documents.tolist() == reference.doc[ids].tolist() and positions.tolist() == reference.pos[ids].tolist()
        assert torch.equal(torch.from_numpy(np.array(dm.train_index.entropies[tier])), reference.entropy[ids])
        assert (positions > 0).all()
    eligible = reference.tier >= 0
    assert (reference.entropy[eligible] > thresholds[0]).all() and (~eligible).any()
    assert all(size > 0 for size in dm.tier_sizes().values())
    # The sampler's ids name the same positions through lookup as through the table.
    flat_ids = torch.arange(len(dm.train_index))
    doc, pos, tier, entropy = dm.train_index.lookup(flat_ids.tolist())
    table_ids = torch.cat(members)
    assert torch.equal(doc, reference.doc[table_ids]) and torch.equal(pos, reference.pos[table_ids])
    assert torch.equal(tier, reference.tier[table_ids]) and torch.equal(entropy, reference.entropy[table_ids])


def test_datamodule_train_batch_contents(ready_dm, tokenizer, thresholds):
    dm = ready_dm
    batch = next(iter(dm.train_dataloader()))
    token_bytes = TokenBytes(tokenizer)
    pad = tokenizer.pad_token_id
    assert len(batch.positions) == 8
    assert (batch.positions > 6).any()  # some contexts are really left-truncated
    for i, (d, p) in enumerate(zip(batch.position_documents.tolist(), batch.positions.tolist())):
        doc = dm.documents[d].tolist()
        assert d not in dm.train_index.held_out and 1 <= p < len(doc)
        assert batch.contexts[i] == doc[max(0, p - 6) : p]
        assert batch.continuations[i] == token_bytes.many(doc[p : p + 3])
        assert batch.next_token_ids[i].item() == doc[p]
        assert batch.entropies[i].item() > thresholds[0]
    assert torch.equal(batch.tiers, assign_tiers(batch.entropies, thresholds))

    rl_positions = set(zip(batch.position_documents.tolist(), batch.positions.tolist()))
    assert batch.document_indices.tolist() == sorted({d for d, _ in rl_positions})
    for row, d in enumerate(batch.document_indices.tolist()):
        doc = dm.documents[d].tolist()
        expected_tokens = doc + [pad] * (batch.documents.shape[1] - len(doc))
        assert batch.documents[row].tolist() == expected_tokens
        assert batch.document_attention_mask[row].tolist() == [1] * len(doc) + [0] * (len(expected_tokens) - len(doc))
        expected_mask = [0 < p < len(doc) and (d, p) not in rl_positions for p in range(len(expected_tokens))]
        assert batch.ntp_mask[row].tolist() == expected_mask

    probabilities = batch.curriculum_probabilities
    torch.testing.assert_close(probabilities, torch.tensor([0.6, 0.3, 0.1]))
    assert batch.curriculum_progress == 0.0 and batch.curriculum_batch == 0
    assert dm.sampler.total_batches == 5  # no trainer: one epoch of batches_per_epoch


def test_datamodule_val_batches_come_from_val_documents(ready_dm):
    val_docs = set(ready_dm.val_candidates.doc.tolist())
    batches = list(ready_dm.val_dataloader())
    assert batches
    for batch in batches:
        assert set(batch.position_documents.tolist()) <= val_docs
        assert (batch.tiers >= 0).all()


def test_datamodule_reuses_cached_scores(make_dm, cache_dir, monkeypatch):
    first = make_dm(scoring_batch_size=2)  # batch size is not part of the key
    first.prepare_data()
    first.score_corpus()
    cached = sorted(cache_dir.glob("entropy-*")) + sorted(cache_dir.glob("index-*"))
    assert len(cached) == 2 and all(path.is_dir() for path in cached)

    monkeypatch.setattr("rmt_lightning.data.entropy_shards.score_entropy", lambda *a, **k: pytest.fail("scored again"))
    monkeypatch.setattr(RMTDataModule, "_load_proxy", lambda self: pytest.fail("proxy loaded although the index is built"))
    second = make_dm()
    second.prepare_data()
    second.setup("fit")
    assert sorted(cache_dir.glob("entropy-*")) + sorted(cache_dir.glob("index-*")) == cached
    assert second.train_index.folder == first.train_index.folder
    assert second.tier_sizes() == first.tier_sizes()


def test_datamodule_scoring_window_changes_cache_file(make_dm, cache_dir):
    make_dm().score_corpus()
    before = set(cache_dir.glob("entropy-*"))
    make_dm(scoring_window=16, scoring_stride=8).score_corpus()
    after = set(cache_dir.glob("entropy-*"))
    assert len(after - before) == 1
    assert not list(cache_dir.glob("**/.*partial*"))


def test_scoring_dtype_auto_is_float32_off_cuda_and_shares_its_cache(make_dm, cache_dir, monkeypatch):
    auto = make_dm()
    assert auto.hparams.scoring_dtype == "auto" and auto.scoring_dtype == "float32"
    auto.score_corpus()
    files = sorted(cache_dir.glob("entropy-*"))
    monkeypatch.setattr("rmt_lightning.data.entropy_shards.score_entropy", lambda *a, **k: pytest.fail("scored again"))
    make_dm(scoring_dtype="float32").score_corpus()
    assert sorted(cache_dir.glob("entropy-*")) == files
    with pytest.raises(ValueError, match="scoring_dtype"):
        make_dm(scoring_dtype="float64")


def test_datamodule_too_few_documents(make_dm, tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": counting_text(n)} for n in range(5, 10)])
    with pytest.raises(ValueError, match="val_documents"):
        make_dm(corpus=str(small), val_documents=5).prepare_data()


def test_datamodule_nothing_above_thresholds(make_dm):
    dm = make_dm(tier_thresholds=(100.0, 101.0, 102.0))
    dm.prepare_data()
    with pytest.raises(ValueError, match="nothing to train with RL"):
        dm.setup("fit")


def test_datamodule_state_dict_carries_sampler(make_dm):
    dm = make_dm()
    dm.setup("fit")
    assert make_dm().state_dict() == {}  # not set up yet
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(3)]
    state = dm.state_dict()
    assert state["sampler"]["batches_yielded"] == 3 and state["sampler"]["epoch"] == 0

    # Lightning fetches one batch ahead: the state follows the last batch handed to the module.
    dm.on_after_batch_transfer(batches[1], 0)
    assert dm.state_dict()["sampler"]["batches_yielded"] == 2

    resumed = make_dm()
    resumed.load_state_dict(state)  # before setup: applied when the sampler exists
    resumed.setup("fit")
    assert resumed.sampler.state_dict() == state["sampler"]
    assert torch.equal(next(iter(resumed.train_dataloader())).positions, next(loader).positions)

    later = make_dm()
    later.setup("fit")
    later.load_state_dict(dm.state_dict())  # after setup: applied at once
    assert later.sampler.state_dict()["batches_yielded"] == 2


@pytest.mark.parametrize(("source", "local"), [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", False), ("gpt2", False), ("openai/gsm8k", False),
    ("./model", True), ("../data/corpus", True), ("/abs/path", True), ("~/models/x", True), ("org/name/sub", True),
    ("folder/", True), ("C:\\models\\x", True),
])
def test_one_rule_tells_a_local_path_from_a_hub_id(source, local):
    from rmt_lightning.runtime.errors import names_a_local_path

    assert names_a_local_path(source) is local


def test_the_corpus_is_read_into_a_token_store_once_and_max_tokens_takes_its_first_documents(tmp_path):
    """Documents come from a memory-mapped token store under the cache folder, built once and mapped by every
    later run; ``max_tokens`` reads only the corpus's first documents, up to that many tokens."""
    from rmt_lightning.data.token_store import TokenStore

    def datamodule(**kwargs):
        return RMTDataModule(model_name_or_path=BUILTIN_TINY, embedded_documents=24, val_documents=4,
                             cache_dir=str(tmp_path), max_document_tokens=1024, **kwargs)

    whole = datamodule()._load_documents()
    assert isinstance(whole, TokenStore) and len(whole) == 24 and whole[0].dtype.kind == "u"
    [folder] = tmp_path.glob("tokens-*")
    again = datamodule()._load_documents()
    assert again.folder == whole.folder and again.manifest["digest"] == whole.manifest["digest"]
    limit = int(whole.lengths[:10].sum())
    first = datamodule(max_tokens=limit)._load_documents()
    assert 5 <= len(first) <= 10 and [d.tolist() for d in first] == [whole[i].tolist() for i in range(len(first))]
    assert len(list(tmp_path.glob("tokens-*"))) == 2  # its own store, beside the whole corpus's
