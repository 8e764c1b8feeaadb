"""Sharded entropy scoring: the shard plan, the same bits for any number of processes and after an interruption,
files cut short or made for another key never used, and the background writer's errors surfacing."""

import json
import warnings
from itertools import pairwise

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rmt_lightning.data import entropy_shards
from rmt_lightning.data.entropy_shards import (
    ShardFolderError,
    ShardScoring,
    load_shards,
    load_shards_flat,
    missing_shards,
    plan_shards,
    score_shards,
    shard_path,
)
from rmt_lightning.data.mathgen import generate_math_corpus
from rmt_lightning.data.scoring import score_entropy

SETTINGS = {"window": 48, "stride": 24, "top_k": None, "batch_size": 3, "shard_tokens": 260}
KEY = "key-a" * 8


@pytest.fixture(scope="module")
def documents(tokenizer):
    """Eleven documents of 20 to ~400 tokens: most span several windows, one is longer than a shard."""
    texts = generate_math_corpus(12, seed=3)
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    cut = [docs[0][:20], docs[1], docs[2][:70], docs[3], docs[4] + docs[5] + docs[6], docs[7][:33], docs[8],
           docs[9][:90], docs[10], docs[11][:51], docs[11]]
    assert max(len(d) for d in cut) > SETTINGS["shard_tokens"]
    return cut


def run(model, tokenizer, documents, folder, rank=0, world_size=1, key=KEY, **extra):
    calls = {name: extra.pop(name) for name in ("stop", "progress", "lengths") if name in extra}
    scoring = ShardScoring(pad_token_id=tokenizer.pad_token_id, rank=rank, world_size=world_size, **{**SETTINGS, **extra})
    return score_shards(model, documents, folder, key, scoring, **calls)


def bits(scores):
    """Every score's float32 bit pattern, so NaN equals NaN and -0.0 differs from 0.0."""
    return torch.cat([s.contiguous().view(torch.int32) for s in scores])


def shard_content(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata(), {name: handle.get_tensor(name).numpy().tobytes() for name in handle.keys()}


def lengths_of(documents):
    return [len(d) for d in documents]


# ---------------------------------------------------------------- plan


def test_plan_cuts_whole_documents_within_the_budget():
    assert plan_shards([3, 4, 5, 10, 2, 2, 1], 8) == [(0, 2), (2, 3), (3, 4), (4, 7)]
    # A shard that fills the budget exactly closes there; one longer than the budget stands alone.
    assert plan_shards([4, 4, 4], 8) == [(0, 2), (2, 3)]
    assert plan_shards([20, 1, 1], 8) == [(0, 1), (1, 3)]
    assert plan_shards([1, 1, 20], 8) == [(0, 2), (2, 3)]
    assert plan_shards([0, 0, 8, 0, 3], 8) == [(0, 4), (4, 5)]
    assert plan_shards([], 8) == []
    assert plan_shards(np.array([5, 5], dtype=np.uint32), 100) == [(0, 2)]
    with pytest.raises(ValueError):
        plan_shards([1], 0)


def test_plan_is_greedy_and_covers_every_document():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=2000)
    plan = plan_shards(lengths, 1000)
    assert plan[0][0] == 0 and plan[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in pairwise(plan))
    for first, end in plan:
        total = int(lengths[first:end].sum())
        assert total <= 1000 or end - first == 1
        # Maximal: the next document would not have fitted.
        if end < len(lengths):
            assert total + int(lengths[end]) > 1000
    assert plan_shards(lengths.tolist(), 1000) == plan


# ---------------------------------------------------------------- processes


def test_one_process_equals_two_ranks_and_score_entropy(model, tokenizer, documents, tmp_path):
    plan = plan_shards(lengths_of(documents), SETTINGS["shard_tokens"])
    assert len(plan) >= 4
    tokens = []
    assert run(model, tokenizer, documents, tmp_path / "one", progress=tokens.append) == len(plan)
    assert sum(tokens) == sum(lengths_of(documents))
    # Rank 1 of 2 first: the order in which processes finish must not matter.
    assert run(model, tokenizer, documents, tmp_path / "two", rank=1, world_size=2) == len(plan) // 2
    assert run(model, tokenizer, documents, tmp_path / "two", rank=0, world_size=2) == (len(plan) + 1) // 2
    one = load_shards(tmp_path / "one", KEY, lengths_of(documents))
    two = load_shards(tmp_path / "two", KEY, lengths_of(documents))
    assert torch.equal(bits(one), bits(two))
    # Same manifest (the plan does not depend on the world size) and the same shard files (safetensors orders
    # the header's metadata freely, so the bytes are compared field by field).
    assert (tmp_path / "one" / "manifest.json").read_text() == (tmp_path / "two" / "manifest.json").read_text()
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["plan"] == [list(s) for s in plan]
    for index in range(len(plan)):
        assert shard_content(shard_path(tmp_path / "one", index)) == shard_content(shard_path(tmp_path / "two", index))

    kwargs = {name: SETTINGS[name] for name in ("window", "stride", "top_k", "batch_size")}
    # Each shard holds exactly what score_entropy gives over that shard's documents.
    for first, end in plan:
        alone = score_entropy(model, documents[first:end], pad_token_id=tokenizer.pad_token_id, **kwargs)
        assert torch.equal(bits(alone), bits(one[first:end]))
    # Over the whole corpus at once the windows are batched with other neighbours, so padding widths differ:
    # equal within float32 rounding, NaN at every first position.
    whole = score_entropy(model, documents, pad_token_id=tokenizer.pad_token_id, **kwargs)
    for ours, reference in zip(one, whole):
        assert ours.shape == reference.shape and ours[0].isnan() and not ours[1:].isnan().any()
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5, equal_nan=True)

    flat, offsets = load_shards_flat(tmp_path / "one", KEY, lengths_of(documents))
    assert offsets.tolist() == [0, *np.cumsum(lengths_of(documents)).tolist()]
    assert torch.equal(bits([flat]), bits(one))


def test_array_documents_score_like_lists(model, tokenizer, documents, tmp_path):
    """A token store hands out numpy arrays of a small dtype; the scores are those of the same ids as lists."""
    arrays = [np.asarray(d, dtype=np.uint16) for d in documents]
    run(model, tokenizer, arrays, tmp_path / "arrays", lengths=np.array(lengths_of(documents), dtype=np.int64))
    run(model, tokenizer, documents, tmp_path / "lists")
    assert torch.equal(bits(load_shards(tmp_path / "arrays", KEY, lengths_of(documents))),
                       bits(load_shards(tmp_path / "lists", KEY, lengths_of(documents))))


# ---------------------------------------------------------------- interruptions


def test_interrupted_pass_resumes_with_the_missing_shards_only(model, tokenizer, documents, tmp_path):
    plan = plan_shards(lengths_of(documents), SETTINGS["shard_tokens"])
    run(model, tokenizer, documents, tmp_path / "straight")
    asked = []

    def stop():
        asked.append(True)
        return len(asked) > 1  # set once the first shard is done

    assert run(model, tokenizer, documents, tmp_path / "cut", stop=stop) == 1
    assert missing_shards(tmp_path / "cut", KEY, plan) == list(range(1, len(plan)))
    assert load_shards(tmp_path / "cut", KEY, lengths_of(documents)) is None
    # On two processes now: each scores only its missing shards.
    assert run(model, tokenizer, documents, tmp_path / "cut", rank=0, world_size=2) == (len(plan) + 1) // 2 - 1
    assert run(model, tokenizer, documents, tmp_path / "cut", rank=1, world_size=2) == len(plan) // 2
    assert missing_shards(tmp_path / "cut", KEY, plan, lengths_of(documents)) == []
    assert run(model, tokenizer, documents, tmp_path / "cut") == 0
    assert torch.equal(bits(load_shards(tmp_path / "cut", KEY, lengths_of(documents))),
                       bits(load_shards(tmp_path / "straight", KEY, lengths_of(documents))))


def test_half_written_or_damaged_shard_is_scored_again(model, tokenizer, documents, tmp_path):
    plan = plan_shards(lengths_of(documents), SETTINGS["shard_tokens"])
    folder = tmp_path / "shards"
    run(model, tokenizer, documents, folder)
    reference = bits(load_shards(folder, KEY, lengths_of(documents)))

    cut = shard_path(folder, 1)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    damaged = shard_path(folder, 2)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF  # same size, one entropy's bits flipped
    damaged.write_bytes(bytes(data))
    # A writer killed before its rename leaves only a hidden staging file, never a shard.
    shard_path(folder, 3).rename(folder / f".{shard_path(folder, 3).name}.partial-host-1")

    with pytest.warns(UserWarning, match="shard"):
        assert missing_shards(folder, KEY, plan) == [1, 2, 3]
    with pytest.warns(UserWarning, match="shard"):
        assert load_shards(folder, KEY, lengths_of(documents)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run(model, tokenizer, documents, folder) == 3
    assert missing_shards(folder, KEY, plan) == []
    assert torch.equal(bits(load_shards(folder, KEY, lengths_of(documents))), reference)


def test_writer_failure_is_raised_and_keeps_finished_shards(model, tokenizer, documents, tmp_path, monkeypatch):
    plan = plan_shards(lengths_of(documents), SETTINGS["shard_tokens"])
    real_write = entropy_shards.write_shard

    def failing_write(folder, index, *args):
        if index == 2:
            raise OSError("disk full")
        real_write(folder, index, *args)

    monkeypatch.setattr(entropy_shards, "write_shard", failing_write)
    with pytest.raises(OSError, match="disk full"):
        run(model, tokenizer, documents, tmp_path)
    assert missing_shards(tmp_path, KEY, plan)[0] == 2
    assert not shard_path(tmp_path, 2).exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


# ---------------------------------------------------------------- keys


def test_folder_of_another_key_or_plan_is_refused(model, tokenizer, documents, tmp_path):
    plan = plan_shards(lengths_of(documents), SETTINGS["shard_tokens"])
    folder = tmp_path / "a"
    run(model, tokenizer, documents, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ShardFolderError, match="another proxy, settings or corpus"):
        run(model, tokenizer, documents, folder, key="key-b")
    with pytest.raises(ShardFolderError, match="other shards"):
        run(model, tokenizer, documents, folder, shard_tokens=SETTINGS["shard_tokens"] * 2)
    with pytest.raises(ShardFolderError):
        load_shards(folder, "key-b", lengths_of(documents))
    with pytest.raises(ShardFolderError):
        missing_shards(folder, "key-b", plan)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

    # A shard file carried over from a folder of another key is never used, even under a matching manifest.
    other = tmp_path / "b"
    run(model, tokenizer, documents, other, key="key-b", stop=lambda: True)
    shard_path(other, 0).write_bytes(shard_path(folder, 0).read_bytes())
    with pytest.warns(UserWarning, match="another key"):
        assert missing_shards(other, "key-b", plan) == list(range(len(plan)))
    # Lengths that are not the corpus the folder was planned for are refused too.
    with pytest.raises(ShardFolderError, match="cover"):
        load_shards(folder, KEY, lengths_of(documents)[:-1])


def test_a_stop_signal_ends_the_pass_after_the_shard_in_flight_and_keeps_it(model, tokenizer, documents, tmp_path):
    """SIGTERM while a shard is scored: that shard is finished and written, no other is started, the previous
    handler is back afterwards, and the pass's bar counted the finished shard's tokens."""
    import os
    import signal

    from rmt_lightning.data import entropy_shards
    from rmt_lightning.data.scoring_pass import ScoringPass

    before = signal.getsignal(signal.SIGTERM)
    original, calls = entropy_shards.score_entropy, []

    def signalled(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    entropy_shards.score_entropy = signalled
    try:
        lengths = lengths_of(documents)
        with ScoringPass(sum(lengths), show=False) as scoring:
            done = run(model, tokenizer, documents, tmp_path, stop=scoring.stop, progress=scoring.progress)
    finally:
        entropy_shards.score_entropy = original
    assert done == 1 and calls == [1] and scoring.agreed == signal.SIGTERM
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 1
    assert signal.getsignal(signal.SIGTERM) == before
