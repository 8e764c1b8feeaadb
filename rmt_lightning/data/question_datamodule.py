"""QuestionDataModule: questions with checkable answers for post-training (``PostTrainModule``): read once,
references parsed once, prompts built once per question, a held-out set for evaluation, and training batches drawn
uniformly by the same seeded, rank-sharded, resumable sampler as the next-token task's positions."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..engine.models import check_model_source, load_tokenizer
from ..engine.prompts import DEFAULT_QUESTION_INSTRUCTION, question_prompt_ids
from ..method.answers import REFERENCE_FORMS
from ..runtime.errors import InputError, at_least
from .batches import DrawsWithProgress
from .drawn import DrawnDataModule
from .mathgen import QUESTION_DIFFICULTIES
from .questions import (
    EMBEDDED_QUESTIONS, Question, QuestionSource, check_question_source, parse_references, read_questions,
)
from .sampler import CurriculumBatchSampler, CurriculumSchedule

__all__ = ["QuestionDataModule", "QuestionBatch"]


@dataclass
class QuestionBatch:
    """``B`` questions: their prompts and parsed references (training or held out). Lightning moves its tensors
    to the device like a dict's."""

    question_ids: Tensor
    """``[B]`` index of each question in its set (training or held out)."""
    prompts: list[list[int]]
    """Prompt token ids of each question (chat template and instruction applied)."""
    references: list[list]
    """Parsed acceptable answers of each question (``method.answers.parse_reference``)."""
    answers: list[list[str]]
    """The reference answers as written (for the completions table)."""
    texts: list[str]
    """The question as text (for the completions table)."""
    curriculum_progress: float | None = None
    """Training progress the batch was drawn at (training batches only)."""
    curriculum_probabilities: Tensor | None = None
    """The sampler's mix (one set of questions: ``[1, 0, 0]``; training batches only)."""
    curriculum_epoch: int | None = None
    """Epoch of the sampler that drew the batch (training batches only)."""
    curriculum_batch: int | None = None
    """Index of the batch within that epoch (training batches only)."""
    drawn_at_step: int | None = None
    """The run's step that drew these questions (several steps share it when a rollout is reused)."""
    rollout_update: int | None = None
    """How many steps after ``drawn_at_step`` this batch's step is."""

    @property
    def size(self) -> int:
        """How many questions the batch holds."""
        return len(self.prompts)


@dataclass
class _QuestionSet:
    questions: list[Question]
    prompts: list[list[int]]
    references: list[list]


class _QuestionBatches(Dataset):
    """Turns a list of question indices (with the draw's description, for training) into a ``QuestionBatch``."""

    def __init__(self, questions: _QuestionSet):
        self.questions = questions

    def __getitem__(self, draw) -> QuestionBatch:
        ids, where = draw if isinstance(draw, tuple) else (draw, {})
        qs = self.questions
        return QuestionBatch(
            question_ids=torch.tensor(ids, dtype=torch.long),
            prompts=[qs.prompts[i] for i in ids],
            references=[qs.references[i] for i in ids],
            answers=[qs.questions[i].answers for i in ids],
            texts=[_as_text(qs.questions[i].content) for i in ids],
            **where,
        )

    def __len__(self) -> int:
        return len(self.questions.prompts)


def _as_text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else str(content[-1]["content"])


class QuestionDataModule(DrawnDataModule):
    """Questions with checkable answers, for post-training with GRPO.

    Args:
        corpus: ``embedded:math`` (built-in questions at ``difficulty``, offline), a local jsonl/json/parquet/csv
            file, or a hub dataset (``openai/gsm8k``, ``Skywork/Skywork-OR1-RL-Data``).
        split: Split of a hub dataset.
        subset: Configuration of a hub dataset (``main`` for GSM8K).
        question_field: Field of the question (dotted path; text, or chat messages used as the conversation).
        answer_field: Field of the reference (dotted path): an answer, a GSM8K solution (``#### 42``), a solution
            with a ``\\boxed{}`` or a JSON list of answers (Skywork-OR1's ``reward_model.ground_truth``).
        reference_form: ``auto`` (by the reference's shape), ``plain``, ``gsm8k``, ``boxed`` or ``json_list``.
        max_questions: Read at most this many training records (None: all; built-in: ``embedded_questions``).
        streaming: Stream a hub dataset's first records instead of downloading it whole (needs ``max_questions``).
        difficulty: Level of the built-in questions: 1 arithmetic, 2 one-step, 3 two-step word problems,
            4 GSM8K-style multi-step (``mathgen.QUESTION_DIFFICULTIES``).
        embedded_questions: Number of built-in training questions.
        val_questions: Held-out questions for validation and test: the first ``val_questions`` records of
            ``val_corpus``, or, without one, a seeded draw of that many held out from ``corpus`` (built-in: generated
            apart, none equal to a training question).
        val_corpus: A separate question set for evaluation (e.g. GSM8K's test split), read with the same fields.
        val_split: Split of ``val_corpus`` (or of ``corpus`` when ``val_corpus`` is the same hub dataset).
        instruction: Prompt around a question given as text; ``{question}`` is replaced by it. Questions given as chat
            messages are used as they are.
        use_chat_template: Wrap the prompt in the tokenizer's chat template when it has one.
        max_prompt_tokens: Questions whose prompt is longer are left out (with one warning that counts them).
        model_name_or_path: Policy model; its tokenizer builds the prompts (linked from ``model`` by the CLI).
        trust_remote_code: Allow custom tokenizer code from the hub (linked from ``model`` by the CLI).
        batch_size: Questions per step per process (each sampled ``group_size`` times).
        batches_per_epoch: Optimizer steps per epoch.
        val_batch_size: Held-out questions per evaluation batch.
        seed: Seed of the held-out draw, the built-in questions and the training draws.
    """

    def __init__(
        self,
        corpus: str = EMBEDDED_QUESTIONS,
        split: str = "train",
        subset: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        reference_form: str = "auto",
        max_questions: int | None = None,
        streaming: bool = False,
        difficulty: int = 1,
        embedded_questions: int = 400,
        val_questions: int = 200,
        val_corpus: str | None = None,
        val_split: str = "test",
        instruction: str = DEFAULT_QUESTION_INSTRUCTION,
        use_chat_template: bool = True,
        max_prompt_tokens: int = 512,
        model_name_or_path: str = "builtin:smollm2-135m-instruct",
        trust_remote_code: bool = False,
        batch_size: int = 8,
        batches_per_epoch: int = 100,
        val_batch_size: int = 50,
        seed: int = 0,
    ):
        super().__init__()
        if reference_form not in REFERENCE_FORMS:
            raise InputError(f"reference_form '{reference_form}' is not a form; valid: {list(REFERENCE_FORMS)}")
        if difficulty not in QUESTION_DIFFICULTIES:
            raise InputError(f"difficulty={difficulty!r} is not a level; valid: {list(QUESTION_DIFFICULTIES)}")
        if "{question}" not in instruction:
            raise InputError("instruction must contain the '{question}' placeholder")
        if streaming and max_questions is None:
            raise InputError("streaming reads a hub dataset's first records: set max_questions too")
        for name, value, minimum in (
            ("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1), ("val_questions", val_questions, 0),
            ("embedded_questions", embedded_questions, 1), ("max_prompt_tokens", max_prompt_tokens, 1),
            ("val_batch_size", val_batch_size, 1), ("max_questions", max_questions or 1, 1),
        ):
            at_least(name, value, minimum)
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_set: _QuestionSet | None = None
        """The training questions, their prompts and parsed references."""
        self.val_set: _QuestionSet | None = None
        """The held-out questions (validation and test)."""

    def _source(self, corpus: str, split: str, max_questions: int | None) -> QuestionSource:
        hp = self.hparams
        return QuestionSource(corpus, split, hp.subset, hp.question_field, hp.answer_field, hp.reference_form,
                              max_questions, hp.streaming, hp.difficulty, hp.seed)

    def check_inputs(self) -> None:
        """The model source and a local question file exist (before any model loads); the fields and references are
        checked when the questions are read, in ``prepare_data``, still before any model loads."""
        hp = self.hparams
        check_model_source(hp.model_name_or_path, "model_name_or_path")
        check_question_source(self._source(hp.corpus, hp.split, None), "corpus")
        if hp.val_corpus:
            check_question_source(self._source(hp.val_corpus, hp.val_split, None), "val_corpus")

    def _read(self) -> tuple[list[Question], list[Question]]:
        """Training and held-out questions."""
        hp = self.hparams
        if hp.val_corpus:
            if hp.val_corpus == hp.corpus and hp.val_split == hp.split:
                raise InputError(f"val_corpus '{hp.val_corpus}' split '{hp.val_split}' is the training set; leave "
                                 "val_corpus unset to hold out val_questions of the corpus instead")
            held_out = read_questions(self._source(hp.val_corpus, hp.val_split, hp.val_questions))
            return read_questions(self._source(hp.corpus, hp.split, hp.max_questions)), held_out
        if hp.corpus == EMBEDDED_QUESTIONS:
            # Generated apart (another seed), and the training questions exclude every held-out text.
            source = self._source(hp.corpus, hp.split, None)
            held_out = read_questions(replace(source, seed=hp.seed + 1), hp.val_questions) if hp.val_questions else []
            training = read_questions(source, hp.embedded_questions, exclude=frozenset(q.content for q in held_out))
            return training, held_out
        questions = read_questions(self._source(hp.corpus, hp.split, hp.max_questions))
        if len(questions) <= hp.val_questions:
            raise InputError(f"corpus '{hp.corpus}' gave {len(questions)} questions, but val_questions={hp.val_questions} "
                             "are held out; use a larger corpus, fewer val_questions, or a val_corpus")
        order = torch.randperm(len(questions), generator=torch.Generator().manual_seed(hp.seed)).tolist()
        held = set(order[: hp.val_questions])
        return [q for i, q in enumerate(questions) if i not in held], [questions[i] for i in sorted(held)]

    def _prepare(self, questions: list[Question], where: str) -> _QuestionSet:
        """Prompts built once per question (too long ones left out) and references parsed once."""
        hp = self.hparams
        prompts = [question_prompt_ids(self.tokenizer, q.content, hp.instruction, hp.use_chat_template) for q in questions]
        kept = [i for i, prompt in enumerate(prompts) if len(prompt) <= hp.max_prompt_tokens]
        if len(kept) < len(questions):
            rank_zero_warn(f"{len(questions) - len(kept)} of the {len(questions)} questions of {where} have a prompt longer "
                           f"than max_prompt_tokens={hp.max_prompt_tokens} and are left out")
        if not kept and questions:
            raise InputError(f"every question of {where} has a prompt longer than max_prompt_tokens={hp.max_prompt_tokens}")
        questions, prompts = [questions[i] for i in kept], [prompts[i] for i in kept]
        return _QuestionSet(questions, prompts, parse_references(questions, where))

    def prepare_data(self) -> None:
        """Check the inputs and read the questions once (their fields and references), before any model loads."""
        self.check_inputs()
        self.setup_questions()

    def setup_questions(self) -> None:
        """Read the questions, build their prompts and parse their references (once)."""
        if self.train_set is not None:
            return
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.model_name_or_path, trust_remote_code=hp.trust_remote_code)
        training, held_out = self._read()
        self.train_set = self._prepare(training, f"corpus '{hp.corpus}'")
        self.val_set = self._prepare(held_out, f"the held-out questions of '{hp.val_corpus or hp.corpus}'")

    def setup(self, stage: str | None = None) -> None:
        if self.sampler is not None:
            return
        hp = self.hparams
        self.setup_questions()
        rank, world_size = self._rank_and_world_size()
        # One "tier" holding every question, drawn uniformly: the curriculum sampler's seeding, rank shards, draw
        # repeats and resume state, without a curriculum.
        self.sampler = CurriculumBatchSampler(
            tier_sizes=[len(self.train_set.prompts), 0, 0], batch_size=hp.batch_size,
            batches_per_epoch=hp.batches_per_epoch, schedule=CurriculumSchedule((1.0, 0.0, 0.0), (1.0, 0.0, 0.0), 0.3, 0.7,
                                                                                curriculum=False),
            seed=hp.seed, rank=rank, world_size=world_size)
        self._load_pending_sampler_state()

    def train_dataloader(self) -> DataLoader:
        self.sampler.total_batches = self._total_batches()
        self.sampler.repeats = self.draw_repeats
        return DataLoader(_QuestionBatches(self.train_set), sampler=DrawsWithProgress(self.sampler), batch_size=None,
                          generator=self._loader_generator())

    def eval_questions(self) -> list[int]:
        """Indices of the held-out questions this rank scores: all of them, cut to a multiple of the world size
        (every rank runs as many batches) and dealt round-robin."""
        rank, world_size = self._rank_and_world_size()
        count = len(self.val_set.prompts) // world_size * world_size
        return list(range(count))[rank::world_size]

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        chosen = self.eval_questions()
        batches = [chosen[i : i + hp.val_batch_size] for i in range(0, len(chosen), hp.val_batch_size)]
        return DataLoader(_QuestionBatches(self.val_set), sampler=batches, batch_size=None,
                          generator=self._loader_generator())

    def test_dataloader(self) -> DataLoader:
        """The held-out questions, as in validation."""
        return self.val_dataloader()
