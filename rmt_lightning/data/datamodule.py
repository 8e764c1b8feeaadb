"""RMTDataModule: corpus -> token store -> proxy entropy (shards scored by every process) -> tier index ->
curriculum batches of RL positions (the batches themselves: batches.py). Each stage is written once to the cache
folder and mapped by every later run and process."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from ..engine.builtin_models import cache_root
from ..engine.models import (
    DTYPES, check_fits_model, check_model_source, load_causal_lm, load_tokenizer, max_positions, model_config,
    parse_dtype, resolve_model_source,
)
from ..engine.tokens import TokenBytes
from ..method import TIER_NAMES, assign_tiers, tier_probabilities
from ..runtime.errors import InputError, as_input_error, at_least, check_writable_directory
from .batches import Candidates, DrawsWithProgress, PositionBatches
from .corpus import EMBEDDED_CORPUS, check_corpus_source
from .entropy_shards import ShardScoring, entropy_folder, read_plan, score_shards
from .drawn import DrawnDataModule
from .sampler import CurriculumBatchSampler, CurriculumSchedule
from .scoring import fingerprint_tokens, proxy_identity, window_plan
from .scoring_pass import ScoringPass, ScoringStopped
from .tier_index import TierIndex, index_folder, index_key, open_or_build_index
from .token_store import (
    CorpusSource, Documents, TokenStore, is_token_store, open_or_build, open_prebuilt, read_settings,
)


class RMTDataModule(DrawnDataModule):
    """Corpus, entropy tiers and the easy-to-hard curriculum sampler of RMT.

    Args:
        corpus: ``embedded:math`` (the project's generated word problems), a local jsonl/json/txt/parquet/csv
            file, a ``datasets`` hub name, or the folder of a token store tokenized elsewhere
            (``token_store.write_token_store``; read whole: ``max_documents`` and ``max_tokens`` do not apply).
        split: Split to read from a hub dataset (local files are read whole).
        subset: Configuration name of a hub dataset (e.g. ``main`` for ``openai/gsm8k``).
        text_field: Record field holding the document text.
        text_template: ``str.format`` template joining several fields, e.g. ``"{question}\\n{answer}"``; overrides text_field.
        max_documents: Read at most this many documents (None: all).
        max_tokens: Read documents until about this many tokens (None: all): the first tokens of a large hub
            corpus, read by streaming, without downloading the rest.
        embedded_documents: Number of documents generated for ``embedded:math``.
        max_document_tokens: Documents longer than this are split into chunks of this many tokens.
        tokenize_processes: Worker processes that tokenize the corpus into its token store, the first time it is
            read (None: one per CPU core, at most 8). Not part of the store's key: any number gives the same store.
        val_documents: Documents held out for validation (never sampled for training); with ``val_corpus``, the
            number of records read from that corpus instead, and the training corpus is used whole.
        val_corpus: A separate corpus for validation and test (e.g. GSM8K's ``test.jsonl`` beside ``train.jsonl``),
            read with the same fields and template (None: hold out ``val_documents`` of ``corpus``).
        val_split: Split of ``val_corpus`` to read when it is a hub dataset.
        model_name_or_path: Policy model; its tokenizer tokenizes the corpus (linked from ``model`` by the CLI).
        proxy_name_or_path: Model that scores entropy (None: the policy checkpoint).
        trust_remote_code: Allow custom model code from the hub (linked from ``model`` by the CLI).
        scoring_window: Tokens per proxy forward when scoring; longer documents use overlapping windows.
        scoring_stride: Step between scoring windows; each window contributes its last ``stride`` positions.
        scoring_top_k: Entropy over the renormalised top-k probabilities (RPT used 16); None: full vocabulary.
        scoring_batch_size: Windows per proxy forward.
        scoring_shard_tokens: Tokens per entropy shard (whole documents): the unit of work one process scores and
            that a stop or a kill can lose; the processes share a corpus only when it has at least as many shards
            as there are processes. Part of the cache key.
        scoring_dtype: Proxy precision: ``auto`` (bfloat16 on a CUDA device, float32 otherwise), float32,
            bfloat16 or float16. Part of the cache key.
        cache_dir: Cache folder of the corpora's token stores, entropy shards and tier indexes (it must be shared by
            the nodes of a multi-node run; None: ``$RMT_LIGHTNING_CACHE/entropy``
            or ``~/.cache/rmt_lightning/entropy``).
        tier_thresholds: Entropy thresholds (nats): <= first never an RL candidate; then easy, medium, hard.
        curriculum: Draw tiers from the easy-to-hard schedule; False draws uniformly over all candidates (RPT).
        p1: Tier probabilities (easy, medium, hard) before ``t1``.
        p2: Tier probabilities from ``t2`` on.
        t1: Progress at which the schedule starts moving from p1 to p2.
        t2: Progress at which it reaches p2.
        batch_size: RL positions per step per process.
        batches_per_epoch: Optimizer steps per epoch (several of them train on one draw when the module reuses
            each rollout for several updates: ``RMTModule``'s ``updates_per_rollout`` and ``mini_batches_per_rollout``).
        max_context_tokens: Context of an RL position, left-truncated to this many tokens.
        continuation_tokens: Corpus tokens after the position kept for the ``prefix`` rule.
        val_positions: Held-out positions scored in validation and test (seeded, the same in every run with the
            same seed and corpus); with several processes they are split evenly across ranks.
        val_batch_size: Positions per validation batch.
        seed: Seed of the document split, the curriculum draws and the validation positions.
    """

    def __init__(
        self,
        corpus: str = EMBEDDED_CORPUS,
        split: str = "train",
        subset: str | None = None,
        text_field: str = "text",
        text_template: str | None = None,
        max_documents: int | None = None,
        max_tokens: int | None = None,
        embedded_documents: int = 2000,
        max_document_tokens: int = 512,
        tokenize_processes: int | None = None,
        val_documents: int = 32,
        val_corpus: str | None = None,
        val_split: str = "test",
        model_name_or_path: str = "builtin:smollm2-135m-instruct",
        proxy_name_or_path: str | None = None,
        trust_remote_code: bool = False,
        scoring_window: int = 512,
        scoring_stride: int = 256,
        scoring_top_k: int | None = None,
        scoring_batch_size: int = 8,
        scoring_shard_tokens: int = 1_048_576,
        scoring_dtype: str = "auto",
        cache_dir: str | None = None,
        tier_thresholds: tuple[float, float, float] = (0.5, 1.0, 1.5),
        curriculum: bool = True,
        p1: tuple[float, float, float] = (0.6, 0.3, 0.1),
        p2: tuple[float, float, float] = (0.1, 0.3, 0.6),
        t1: float = 0.3,
        t2: float = 0.7,
        batch_size: int = 4,
        batches_per_epoch: int = 100,
        max_context_tokens: int = 256,
        continuation_tokens: int = 8,
        val_positions: int = 64,
        val_batch_size: int = 16,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 < t1 < t2 < 1:
            raise InputError(f"t1={t1!r}, t2={t2!r} are not valid: the curriculum needs 0 < t1 < t2 < 1")
        with as_input_error():
            tier_probabilities(0.0, p1, p2, t1, t2)
            window_plan(1, scoring_window, scoring_stride)
        with as_input_error("tier_thresholds: "):
            assign_tiers(torch.zeros(0), tier_thresholds)
        if scoring_dtype != "auto" and scoring_dtype not in DTYPES:
            valid = ", ".join(["auto", *sorted(DTYPES)])
            raise InputError(f"scoring_dtype '{scoring_dtype}' is not supported; valid: {valid}")
        for name, value, minimum in (
            ("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1), ("val_documents", val_documents, 0),
            ("max_context_tokens", max_context_tokens, 1), ("max_document_tokens", max_document_tokens, 2),
            ("continuation_tokens", continuation_tokens, 1), ("embedded_documents", embedded_documents, 1),
            ("val_positions", val_positions, 0), ("val_batch_size", val_batch_size, 1), ("scoring_batch_size", scoring_batch_size, 1),
            ("scoring_shard_tokens", scoring_shard_tokens, 1), ("tokenize_processes", tokenize_processes or 1, 1),
        ):
            at_least(name, value, minimum)
        self.save_hyperparameters()
        self._inputs_checked = False
        self.tokenizer = None
        self.documents: Documents = Documents([])
        """The training corpus's documents, then ``val_corpus``'s, as token-id arrays mapped from their stores."""
        self.train_index: TierIndex | None = None
        """The training corpus's candidate positions per tier, mapped from disk."""
        self.val_index: TierIndex | None = None
        """``val_corpus``'s index (its documents all held out), when there is one."""
        self.val_candidates: Candidates | None = None
        """The held-out documents' positions (validation and test), in memory."""
        self.scoring_passes: list[dict] = []
        """What each scoring pass of this process did: corpus, tokens scored (by every process), tokens an earlier
        pass had scored, seconds scoring and seconds loading the proxy, processes."""

    # ---- corpus and scores -------------------------------------------------------------------------

    @property
    def proxy_source(self) -> str:
        return self.hparams.proxy_name_or_path or self.hparams.model_name_or_path

    @property
    def cache_folder(self) -> Path:
        """Folder of the entropy cache files."""
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else cache_root() / "entropy"

    def check_inputs(self) -> None:
        """Check what this datamodule will read, before any model is loaded: the policy and proxy sources, the
        corpus files, the cache folder, and the lengths against the positions the models support. Raises
        ``InputError``; the corpus's fields and size are checked when it is read, still before any model loads."""
        if self._inputs_checked:
            return
        hp = self.hparams
        check_model_source(hp.model_name_or_path, "model_name_or_path")
        if hp.proxy_name_or_path:
            check_model_source(hp.proxy_name_or_path, "proxy_name_or_path")
        check_corpus_source(hp.corpus, "corpus")
        if hp.val_corpus:
            check_corpus_source(hp.val_corpus, "val_corpus")
        check_writable_directory(self.cache_folder, "entropy cache folder (cache_dir)")
        policy_limit = max_positions(model_config(hp.model_name_or_path, hp.trust_remote_code))
        check_fits_model({"max_context_tokens": hp.max_context_tokens, "max_document_tokens": hp.max_document_tokens},
                         hp.model_name_or_path, policy_limit)
        # A scoring window never exceeds a document, so the shorter of the two is what the proxy sees.
        window = {"scoring_window": hp.scoring_window} if hp.scoring_window < hp.max_document_tokens else {"max_document_tokens": hp.max_document_tokens}
        check_fits_model(window, self.proxy_source, max_positions(model_config(self.proxy_source, hp.trust_remote_code)))
        self._inputs_checked = True

    def _read(self, corpus: str, split: str, max_documents: int | None, max_tokens: int | None = None) -> TokenStore:
        """The corpus's token store: built once (streaming its texts) for this tokenizer and these read settings,
        then mapped by every run and process."""
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.model_name_or_path, trust_remote_code=hp.trust_remote_code)
        if is_token_store(corpus):
            return open_prebuilt(corpus, self.tokenizer, hp.max_document_tokens)
        settings = read_settings(CorpusSource(corpus, split, hp.text_field, hp.text_template, hp.subset, max_documents,
                                              max_tokens, hp.embedded_documents, hp.seed))
        processes = hp.tokenize_processes or min(8, os.cpu_count() or 1)
        return open_or_build(self.cache_folder, self.tokenizer, settings, max_document_tokens=hp.max_document_tokens,
                             num_proc=processes)

    def _load_documents(self) -> TokenStore:
        """The training corpus (with its held-out validation documents when there is no ``val_corpus``)."""
        hp = self.hparams
        documents = self._read(hp.corpus, hp.split, hp.max_documents, hp.max_tokens)
        held_out = 0 if hp.val_corpus else hp.val_documents
        if len(documents) <= held_out:
            raise ValueError(
                f"corpus '{hp.corpus}' gave {len(documents)} documents, but val_documents={hp.val_documents} "
                "are held out; use a larger corpus or fewer val_documents"
            )
        return documents

    def _load_val_documents(self) -> TokenStore | None:
        """The first ``val_documents`` records of ``val_corpus`` (none without one)."""
        hp = self.hparams
        if not hp.val_corpus:
            return None
        if hp.val_corpus == hp.corpus and hp.val_split == hp.split:
            raise ValueError(
                f"val_corpus '{hp.val_corpus}' is the training corpus, so validation would score trained-on text; "
                "leave val_corpus unset to hold out val_documents of the corpus instead"
            )
        documents = self._read(hp.val_corpus, hp.val_split, hp.val_documents)
        if not documents:
            raise ValueError(f"val_corpus '{hp.val_corpus}' gave no document to validate on")
        return documents

    def scores_key(self, store: TokenStore) -> str:
        """Key of a corpus's entropy shards (``entropy_shards.entropy_folder`` names their folder by it): its tokens
        (the store's digest), the proxy and the scoring settings."""
        hp = self.hparams
        source = resolve_model_source(self.proxy_source)
        config = model_config(source, hp.trust_remote_code)
        settings = {"window": hp.scoring_window, "stride": hp.scoring_stride, "top_k": hp.scoring_top_k,
                    "dtype": self.scoring_dtype, "shard_tokens": hp.scoring_shard_tokens}
        return fingerprint_tokens(store.manifest["digest"], proxy_identity(source, config.to_json_string()), settings)

    def _scoring_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    @property
    def scoring_dtype(self) -> str:
        """The proxy's precision: ``scoring_dtype``, with ``auto`` resolved for the device that scores."""
        if self.hparams.scoring_dtype != "auto":
            return self.hparams.scoring_dtype
        # Entropy only ranks positions into tiers, which bf16 logits do as well as float32 ones at half the cost.
        return "bfloat16" if self._scoring_device().type == "cuda" else "float32"

    def _load_proxy(self) -> torch.nn.Module:
        hp = self.hparams
        proxy = load_causal_lm(self.proxy_source, dtype=parse_dtype(self.scoring_dtype), trust_remote_code=hp.trust_remote_code)
        return proxy.to(self._scoring_device())

    def _score_shards(self, store: TokenStore, folder: Path, key: str, name: str) -> None:
        """Every process scores its share of the shards ``folder`` lacks; on a stop signal, all stop together."""
        hp = self.hparams
        rank, world_size = self._rank_and_world_size()
        reduce = None
        if world_size > 1:
            strategy = self.trainer.strategy

            def reduce(tensor: Tensor, op: str) -> Tensor:
                return strategy.reduce(tensor.to(strategy.root_device), reduce_op=op).cpu()

        with ScoringPass(store.num_tokens, reduce, show=rank == 0, description=f"entropy of {name}") as scoring:
            settings = ShardScoring(hp.scoring_window, hp.scoring_stride, hp.scoring_top_k, hp.scoring_batch_size,
                                    self.tokenizer.pad_token_id, hp.scoring_shard_tokens, rank, world_size)
            score_shards(scoring.timed_loading(self._load_proxy), store, folder, key, settings, stop=scoring.stop,
                         progress=scoring.progress, lengths=store.lengths)
            scoring.stop()  # the last round's tokens, and a signal that came during it
        gc.collect()
        self.scoring_passes.append({"corpus": name, "tokens": scoring.scored_tokens, "resumed_tokens": scoring.resumed_tokens,
                                    "seconds": scoring.scoring_seconds, "loading_seconds": scoring.loading_seconds,
                                    "processes": world_size})
        if scoring.scored_tokens:
            rank_zero_info(f"entropy of {name}: {scoring.scored_tokens:,} tokens scored in {scoring.scoring_seconds:.1f} s by "
                           f"{world_size} process(es), {scoring.scored_tokens / max(scoring.scoring_seconds, 1e-9):,.0f} tokens/s "
                           "(the proxy's loading not counted)")
        if scoring.agreed:
            finished = len(list(folder.glob("shard-*.safetensors")))
            raise ScoringStopped(scoring.agreed, str(folder), finished, len(read_plan(folder, key)), rank)

    def _any_rank(self, flag: bool) -> bool:
        return self.trainer.strategy.reduce_boolean_decision(flag, all=False) if self._rank_and_world_size()[1] > 1 else flag

    def _index(self, store: TokenStore, name: str, held_out_rule: dict, held_out: Callable[[], list[int]]) -> TierIndex:
        """``store``'s tier index: mapped when built, else its entropy is scored by every process (the shards that
        are missing) and the index built from the shards."""
        hp = self.hparams
        scores_key = self.scores_key(store)
        key = index_key(scores_key, hp.tier_thresholds, held_out_rule)
        index = TierIndex.open(index_folder(self.cache_folder, key), store, key)
        if self._any_rank(index is None):
            shard_folder = entropy_folder(self.cache_folder, scores_key)
            self._score_shards(store, shard_folder, scores_key, name)
            if self._rank_and_world_size()[1] > 1:
                self.trainer.strategy.barrier("entropy scored")
            index = open_or_build_index(self.cache_folder, key, store, shard_folder=shard_folder, scores_key=scores_key,
                                        thresholds=hp.tier_thresholds, held_out=held_out)
        return index

    def prepare_data(self) -> None:
        """Check the inputs and build the corpora's token stores (once per node: Lightning calls it on local rank
        0); ``setup`` on every process then scores what is missing and maps the results."""
        self.check_inputs()
        self._load_documents()
        self._load_val_documents()

    def score_corpus(self) -> None:
        """Score and index the corpora, shared by every process (each scores its share of the shards a killed or
        earlier pass did not finish), or map them when that was done before. ``setup`` calls it, and so does
        ``python -m rmt_lightning score``."""
        if self.train_index is not None:
            return
        hp = self.hparams
        training, validation = self._load_documents(), self._load_val_documents()
        if validation is None:
            def held_out() -> list[int]:
                order = torch.randperm(len(training), generator=torch.Generator().manual_seed(hp.seed))
                return sorted(order[: hp.val_documents].tolist())

            rule = {"seed": hp.seed, "val_documents": hp.val_documents, "documents": len(training)}
            self.train_index = self._index(training, hp.corpus, rule, held_out)
        else:
            # Indexed separately, so the training corpus's index is the same with any val_corpus.
            self.train_index = self._index(training, hp.corpus, {"none": True}, list)
            self.val_index = self._index(validation, hp.val_corpus, {"all": True}, lambda: list(range(len(validation))))
        self.documents = Documents([training] if validation is None else [training, validation])

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        hp = self.hparams
        self.score_corpus()
        if self.val_index is None:
            val_entropies = self.train_index.held_out_entropies()
        else:
            first = len(self.train_index.store)
            val_entropies = {first + d: entropy for d, entropy in self.val_index.held_out_entropies().items()}
        self.val_candidates = Candidates.from_scores(val_entropies, sorted(val_entropies), hp.tier_thresholds)
        sizes = self.train_index.sizes.tolist()
        if sum(sizes) == 0:
            highest = self.train_index.max_entropy
            raise InputError(
                f"no position of corpus '{hp.corpus}' has entropy above tier_thresholds[0]={hp.tier_thresholds[0]} under "
                f"proxy '{self.proxy_source}' (the highest is {float('nan') if highest is None else highest:.3f} nats), "
                "so there is nothing to train with RL; valid: a first threshold below the highest entropy, or another corpus"
            )
        empty = [name for name, size in zip(TIER_NAMES, sizes) if size == 0]
        if empty and hp.curriculum:
            rank_zero_warn(
                f"curriculum tier(s) {empty} have no candidate position under tier_thresholds={tuple(hp.tier_thresholds)}; "
                "their share of p1/p2 is spread over the other tiers (renormalised)"
            )
        rank, world_size = self._rank_and_world_size()
        self.sampler = CurriculumBatchSampler(
            tier_sizes=sizes, batch_size=hp.batch_size, batches_per_epoch=hp.batches_per_epoch,
            schedule=CurriculumSchedule(hp.p1, hp.p2, hp.t1, hp.t2, hp.curriculum), seed=hp.seed, rank=rank,
            world_size=world_size,
        )
        self._load_pending_sampler_state()

    def tier_sizes(self) -> dict[str, int]:
        """Number of training candidates per tier."""
        return {name: int(size) for name, size in zip(TIER_NAMES, self.train_index.sizes)}

    # ---- loaders -----------------------------------------------------------------------------------

    def _batches(self, candidates: Candidates | TierIndex) -> PositionBatches:
        hp = self.hparams
        return PositionBatches(
            self.documents, candidates, TokenBytes(self.tokenizer), self.tokenizer.pad_token_id,
            hp.max_context_tokens, hp.continuation_tokens,
        )

    def train_dataloader(self) -> DataLoader:
        self.sampler.total_batches = self._total_batches()
        self.sampler.repeats = self.draw_repeats
        # Its own generator: creating the iterator would otherwise draw from the global one, which a resumed
        # run restores from the checkpoint and must find untouched.
        return DataLoader(self._batches(self.train_index), sampler=DrawsWithProgress(self.sampler), batch_size=None,
                          generator=self._loader_generator())

    def eval_positions(self) -> Tensor:
        """Indices into ``val_candidates`` of the positions this rank scores: a seeded draw of ``val_positions``
        among the held-out positions with ``H > tier_thresholds[0]`` (the widest evaluation split), dealt
        round-robin across ranks. The draw is cut to a multiple of the world size, so every rank runs the same
        number of batches (generation and metric reduction are collectives under DDP and FSDP)."""
        hp = self.hparams
        eligible = torch.nonzero(self.val_candidates.tier >= 0).flatten()
        chosen = eligible[torch.randperm(len(eligible), generator=torch.Generator().manual_seed(hp.seed))[: hp.val_positions]]
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return chosen[: len(chosen) // world_size * world_size][rank::world_size]

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        chosen = self.eval_positions()
        batches = [chosen[i : i + hp.val_batch_size].tolist() for i in range(0, len(chosen), hp.val_batch_size)]
        return DataLoader(self._batches(self.val_candidates), sampler=batches, batch_size=None, generator=self._loader_generator())

    def test_dataloader(self) -> DataLoader:
        """The same held-out positions as validation: ``test`` scores a finished model on them."""
        return self.val_dataloader()

    # ---- state -------------------------------------------------------------------------------------



