"""Data in: the standard formats (plain and conversational), their sources, chat rendering,
and alignkit's feedback formats. Every error names the file, the line (or row) and the field.
"""

from alignkit.data.chat import TEMPLATE_MODES, PromptFormat, plain_prompt, stop_token_ids
from alignkit.data.formats import (
    Example,
    Preference,
    Prompt,
    Unpaired,
    detect_kind,
    parse_example,
    parse_preference,
    parse_prompt,
    parse_unpaired,
)
from alignkit.data.jsonl import read_jsonl, read_prompt_records, read_sft_pairs
from alignkit.data.pairs import preference_pairs
from alignkit.data.sources import (
    load_examples,
    load_preferences,
    load_prompts,
    load_unpaired,
    read_records,
    split_heldout,
)

__all__ = [
    "TEMPLATE_MODES",
    "Example",
    "Preference",
    "Prompt",
    "PromptFormat",
    "Unpaired",
    "detect_kind",
    "load_examples",
    "load_preferences",
    "load_prompts",
    "load_unpaired",
    "parse_example",
    "parse_preference",
    "parse_prompt",
    "parse_unpaired",
    "plain_prompt",
    "preference_pairs",
    "read_jsonl",
    "read_prompt_records",
    "read_records",
    "read_sft_pairs",
    "split_heldout",
    "stop_token_ids",
]
