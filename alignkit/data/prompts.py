"""Task records -> the token ids a model reads: one path for every sampler and trainer.

A task gives each record's conversation (``task.prompt_messages(record)``; a task without that
method gives verbatim text through ``task.format_prompt(record)``); a :class:`PromptFormat`
renders it for one model's tokenizer (its chat template, or the plain ``User:/Assistant:``
form, ``task.template``). The rollout, evaluation, feedback sampling and SFT all encode
through here, so the policy samples exactly the token sequences it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from alignkit.data.chat import Conversation, PromptFormat
from alignkit.models.generation import pad_prompts

__all__ = ["conversations", "encode_prompts", "prompt_format", "template_mode"]


def template_mode(cfg: Any) -> str:
    """``task.template`` (``auto`` when the task node has no such key)."""
    task = cfg.get("task") if hasattr(cfg, "get") else None
    value = task.get("template") if task is not None and hasattr(task, "get") else None
    return str(value or "auto")


def prompt_format(cfg: Any, tokenizer: Any, model: Any = None) -> PromptFormat:
    """The :class:`PromptFormat` of ``tokenizer`` under the run's ``task.template``."""
    return PromptFormat(tokenizer, template_mode(cfg), model=model)


def conversation(task: Any, record: Any, raw: bool = False) -> Conversation:
    """``record``'s prompt: its messages, or verbatim text (a task without
    ``prompt_messages``, or a plain-text record under ``task.template=raw``)."""
    messages = getattr(task, "prompt_messages", None)
    if messages is None:
        return str(task.format_prompt(record))
    is_conv = getattr(task, "is_conversational", None)
    conversational = True if is_conv is None else bool(is_conv(record))
    prompt = messages(record)
    if raw and not conversational and not isinstance(prompt, str):
        return str(prompt[-1].get("content", ""))
    return prompt


def conversations(task: Any, records: Sequence[Any], fmt: PromptFormat) -> list[Conversation]:
    return [conversation(task, r, fmt.raw_text) for r in records]


def encode_prompts(
    fmt: PromptFormat, task: Any, records: Sequence[Any], max_length: int | None
) -> tuple[Tensor, Tensor, list[str]]:
    """(B, P) left-padded ids and mask, and the B prompt texts as the model sees them."""
    convs = conversations(task, records, fmt)
    ids, mask = pad_prompts(fmt.tokenizer, fmt.encode_prompts(convs), max_length)
    return ids, mask, [fmt.prompt_text(c) for c in convs]
