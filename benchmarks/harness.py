"""Run real ``RMTModule`` training steps under a Lightning ``Trainer`` on one fixed batch, and time each step.

The batch is built as ``RMTDataModule`` builds one (contexts before a position, the continuation's bytes,
the whole documents with an NTP mask that leaves out token 0 and the RL positions), from the embedded corpus,
without entropy scoring: the benchmarks time steps, not the curriculum.
"""

from __future__ import annotations

import dataclasses

import time
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader

from rmt_lightning import RMTModule
from rmt_lightning.data.batches import PositionBatch
from rmt_lightning.data.mathgen import generate_math_corpus
from rmt_lightning.engine.padding import pad_right
from rmt_lightning.engine.tokens import TokenBytes


def corpus_batch(tokenizer, positions: int, context_tokens: int = 48, max_document_tokens: int = 512, seed: int = 0) -> PositionBatch:
    """One training batch of ``positions`` RL positions, one per document, ``context_tokens`` of context each."""
    token_bytes = TokenBytes(tokenizer)
    documents = []
    for text in generate_math_corpus(positions * 4, seed=seed):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_document_tokens]
        if len(ids) >= context_tokens + 16:
            documents.append(ids)
        if len(documents) == positions:
            break
    contexts, continuations, where = [], [], []
    for index, doc in enumerate(documents):
        # A position past the context length, spread over the documents' bodies.
        p = context_tokens + (index * 7) % max(1, len(doc) - context_tokens - 8)
        contexts.append(doc[p - context_tokens : p])
        continuations.append(token_bytes.many(doc[p : p + 8]))
        where.append(p)
    padded, attention = pad_right(documents, tokenizer.pad_token_id)
    ntp_mask = attention.bool()
    ntp_mask[:, 0] = False
    for row, p in enumerate(where):
        ntp_mask[row, p] = False
    return PositionBatch(
        position_documents=torch.arange(positions), positions=torch.tensor(where),
        next_token_ids=torch.tensor([doc[p] for doc, p in zip(documents, where)]),
        tiers=torch.full((positions,), 2, dtype=torch.long), entropies=torch.ones(positions),
        contexts=contexts, continuations=continuations, documents=padded, document_attention_mask=attention,
        ntp_mask=ntp_mask, document_indices=torch.arange(positions),
        curriculum_probabilities=torch.tensor([0.0, 0.0, 1.0]), curriculum_progress=0.0,
    )


class StepTimer(L.Callback):
    """Wall and CPU time of every training step, with the module's logged ``timing/*`` and a few train figures."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        record = {"wall": time.perf_counter() - self._wall, "cpu": time.process_time() - self._cpu}
        for key in ("timing/generate", "timing/update", "train/completion_length", "train/reasoning_length",
                    "train/clipped_ratio", "train/budget"):
            value = trainer.callback_metrics.get(key)
            if value is not None:
                record[key] = float(value)
        self.steps.append(record)


def make_module(**overrides) -> RMTModule:
    return RMTModule(**overrides)


def run_steps(module: RMTModule, batch: PositionBatch, steps: int, callbacks=(), profiler=None) -> StepTimer:
    """Train ``module`` for ``steps`` optimizer steps on ``batch`` repeated (each rollout feeding the module's
    ``steps_per_rollout`` steps, as the datamodule's repeated draws do); returns the per-step timer."""
    timer = StepTimer()
    repeat = module.steps_per_rollout
    batches = [dataclasses.replace(batch, drawn_at_step=step - step % repeat, rollout_update=step % repeat)
               for step in range(steps)]
    loader = DataLoader(batches, batch_size=None, collate_fn=lambda item: item)
    trainer = L.Trainer(
        accelerator="auto", devices=1, max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        use_distributed_sampler=False, callbacks=[timer, *callbacks], profiler=profiler,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader)
    return timer
