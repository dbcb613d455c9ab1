"""SFT demonstrations for any task: the standard formats, and alignkit's verbatim form.

``task.sft_data`` accepts every standard SFT format (:func:`alignkit.data.formats.parse_example`:
plain or conversational prompt/completion, ``messages``) and alignkit's own
``{"prompt": ..., "response": ...}`` lines, whose prompt is the *verbatim* text the model sees
(e.g. ``"User: What is 2 plus 3?\\nAssistant:"``): it is not rendered again.
"""

from __future__ import annotations

from alignkit.data.chat import Conversation, PromptFormat
from alignkit.data.formats import parse_example
from alignkit.data.jsonl import require_str
from alignkit.data.sources import read_records
from alignkit.errors import DataError

__all__ = ["read_demonstrations"]


def read_demonstrations(
    source: str, fmt: PromptFormat, *, split: str | None = None
) -> list[tuple[Conversation, str]]:
    """(prompt, response) pairs of ``source``; errors name the file, line and field."""
    pairs: list[tuple[Conversation, str]] = []
    for where, raw in read_records(source, split=split):
        if "response" in raw and "completion" not in raw:
            prompt = require_str(raw, "prompt", where)
            pairs.append((prompt, require_str(raw, "response", where)))
            continue
        example = parse_example(raw, where)
        prompt: Conversation = list(example.prompt.messages)
        if fmt.raw_text and not example.prompt.conversational:
            prompt = example.prompt.text
        pairs.append((prompt, example.completion))
    if not pairs:
        raise DataError(f"{source}: no records")
    return pairs
