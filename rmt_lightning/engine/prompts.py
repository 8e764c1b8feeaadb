"""The prompt and the answer format, each literal defined once: the task instruction, the think tags and
``\\boxed{`` (from ``method.rewards``, which parses them), the text a response starts from, the scaffold budget
forcing writes, and the format warm-up's demonstrations."""

from __future__ import annotations

from ..method.rewards import BOXED, THINK_CLOSE, THINK_OPEN

__all__ = [
    "THINK_OPEN", "THINK_CLOSE", "BOXED", "RESPONSE_PREFIX", "ANSWER_SCAFFOLD", "BOX_SCAFFOLD", "DEFAULT_INSTRUCTION",
    "render_instruction", "build_prompt_ids", "demonstration", "DEFAULT_QUESTION_INSTRUCTION", "question_prompt_ids",
]

RESPONSE_PREFIX = f"{THINK_OPEN}\n"
"""What a response starts from by default: the model begins inside its thinking."""

ANSWER_SCAFFOLD = f"{THINK_CLOSE} {BOXED}"
"""What budget forcing writes when thinking stops: the model then only writes the answer and ``}``."""

BOX_SCAFFOLD = f" {BOXED}"
"""What budget forcing writes after a ``</think>`` the model wrote without a ``\\boxed{`` after it."""

DEFAULT_INSTRUCTION = (
    "Predict the next token of the text between <|text_start|> and <|text_end|>. "
    f"Think inside {THINK_OPEN}{THINK_CLOSE} using exactly {{budget}} tokens, then write the next token in {BOXED}}}.\n"
    "<|text_start|>{context}<|text_end|>"
)
"""RPT's task instruction with RMT's budget sentence; ``{budget}`` and ``{context}`` are filled in."""


def render_instruction(template: str, budget: int, context: str) -> str:
    """Fill ``{budget}`` and ``{context}`` by plain replacement, so other braces need no escaping."""
    return template.replace("{budget}", str(budget)).replace("{context}", context)


def build_prompt_ids(tokenizer, context: str, budget: int, instruction: str = DEFAULT_INSTRUCTION,
                     response_prefix: str = RESPONSE_PREFIX, use_chat_template: bool = True) -> list[int]:
    """Prompt token ids: the instruction as a user turn (chat template when the tokenizer has one), then the
    text the response starts from."""
    user = render_instruction(instruction, budget, context)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text + response_prefix, add_special_tokens=False)["input_ids"]
    return tokenizer(user + "\n" + response_prefix)["input_ids"]


def demonstration(thought: str, answer: str) -> str:
    """A response in the answer format, after the response prefix: ``thought</think> \\boxed{answer}``."""
    return f"{thought}{ANSWER_SCAFFOLD}{answer}}}"


def demonstration_ids(tokenizer, contexts: list[list[int]], continuations: list[list[bytes]], thought_template: str,
                      budgets: list[int]) -> list[list[int]]:
    """Token ids of the format demonstration after each context: ``thought</think> \\boxed{next token}``, where
    ``{context_tail}`` in ``thought_template`` stands for the context's last B tokens (B: its entry of
    ``budgets``) and ``{next_token}`` for the true next token (the first of its continuation)."""
    responses = []
    for context, continuation, tail in zip(contexts, continuations, budgets):
        target = continuation[0].decode("utf-8", errors="replace")
        thought = thought_template.replace("{context_tail}", tokenizer.decode(context[-tail:]))
        thought = thought.replace("{next_token}", target)
        responses.append(tokenizer(demonstration(thought, target), add_special_tokens=False)["input_ids"])
    return responses


DEFAULT_QUESTION_INSTRUCTION = f"{{question}}\nPut your final answer within {BOXED}}}."
"""The question task's prompt (the instruction of open-r1 and Qwen's math models); ``{question}`` is filled in."""


def question_prompt_ids(tokenizer, question: str | list[dict], instruction: str = DEFAULT_QUESTION_INSTRUCTION,
                        use_chat_template: bool = True) -> list[int]:
    """Prompt token ids of a question: ``instruction`` around the question text as a user turn, or a conversation
    (chat messages) as it is, in the tokenizer's chat template when it has one and ``use_chat_template``."""
    messages = question if isinstance(question, list) else [
        {"role": "user", "content": instruction.replace("{question}", question)}]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in messages) + "\n")["input_ids"]
