"""``generate_group`` with its settings and decoding options as keywords, for tests that vary one at a time."""

from __future__ import annotations

from dataclasses import fields

from rmt_lightning.engine.generation import DecodingOptions, GenerationSettings, generate_group

_DECODING = {f.name for f in fields(DecodingOptions)}
_CALL = {"generator", "token_bytes", "all_finished"}


def generate(model, tokenizer, prompts, group_size, **keywords):
    """``generate_group(model, tokenizer, prompts, GenerationSettings(group_size, ...), DecodingOptions(...), ...)``
    from one set of keywords."""
    decoding = {k: keywords.pop(k) for k in list(keywords) if k in _DECODING}
    call = {k: keywords.pop(k) for k in list(keywords) if k in _CALL}
    settings = GenerationSettings(group_size, **keywords)
    return generate_group(model, tokenizer, prompts, settings, DecodingOptions(**decoding), **call)
