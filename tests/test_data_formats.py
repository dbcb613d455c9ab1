"""The standard dataset formats: every kind, plain and conversational, and every malformed case.

The records are the ones TRL's dataset-format guide shows, so a file written for TRL reads here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from alignkit.data.formats import (
    Example,
    Preference,
    Prompt,
    Unpaired,
    derive_id,
    detect_kind,
    parse_example,
    parse_preference,
    parse_prompt,
    parse_unpaired,
    split_common_text,
)
from alignkit.errors import ConfigError, DataError

W = "data.jsonl:7"
SKY = "What color is the sky?"
USER = {"role": "user", "content": SKY}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}

# The records of TRL's dataset-format guide.
PLAIN_PROMPT = {"prompt": "The sky is"}
PLAIN_EXAMPLE = {"prompt": "The sky is", "completion": " blue."}
PLAIN_PREF = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
PLAIN_IMPLICIT = {"chosen": "The sky is blue.", "rejected": "The sky is green."}
PLAIN_UNPAIRED = {"prompt": "The sky is", "completion": " blue.", "label": True}
CONV_PROMPT = {"prompt": [USER]}
CONV_EXAMPLE = {"prompt": [USER], "completion": [BLUE]}
CONV_MESSAGES = {"messages": [USER, BLUE]}
CONV_PREF = {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}
CONV_IMPLICIT = {"chosen": [USER, BLUE], "rejected": [USER, GREEN]}
CONV_UNPAIRED = {"prompt": [USER], "completion": [BLUE], "label": False}


def plain(text: str, **meta: Any) -> Prompt:
    msgs = ({"role": "user", "content": text},)
    return Prompt(id=derive_id(msgs), messages=msgs, conversational=False, meta=meta)


def conv(*messages: dict[str, Any], **meta: Any) -> Prompt:
    return Prompt(id=derive_id(messages), messages=messages, conversational=True, meta=meta)


# --------------------------------------------------------------------------------------------
# every kind, plain and conversational
# --------------------------------------------------------------------------------------------


def test_prompt_only_plain_and_conversational() -> None:
    p = parse_prompt(PLAIN_PROMPT, W)
    assert p == plain("The sky is")
    assert (p.text, p.conversational, p.messages) == (
        "The sky is",
        False,
        ({"role": "user", "content": "The sky is"},),
    )
    c = parse_prompt(CONV_PROMPT, W)
    assert c.conversational and c.messages == (USER,) and c.text == SKY
    # Same content, same id, whatever the form it came in.
    assert parse_prompt({"prompt": SKY}, W).id == c.id


def test_messages_prompt_is_the_conversation_before_the_last_reply() -> None:
    system = {"role": "system", "content": "Be brief."}
    follow = {"role": "user", "content": "And at night?"}
    whole = parse_prompt({"messages": [system, USER, BLUE, follow]}, W)
    assert whole.messages == (system, USER, BLUE, follow) and whole.text == "And at night?"
    dark = {"role": "assistant", "content": "Dark."}
    before = parse_prompt({"messages": [system, USER, BLUE, follow, dark]}, W)
    assert before == whole


def test_example_plain_conversational_and_messages() -> None:
    assert parse_example(PLAIN_EXAMPLE, W) == Example(plain("The sky is"), " blue.")
    assert parse_example(CONV_EXAMPLE, W) == Example(conv(USER), "It is blue.")
    assert parse_example(CONV_MESSAGES, W) == Example(conv(USER), "It is blue.")
    follow = {"role": "user", "content": "And at night?"}
    multi = parse_example(
        {"messages": [USER, BLUE, follow, {"role": "assistant", "content": "Dark."}]}, W
    )
    assert multi == Example(conv(USER, BLUE, follow), "Dark.")


def test_preference_explicit_plain_and_conversational() -> None:
    assert parse_preference(PLAIN_PREF, W) == Preference(plain("The sky is"), " blue.", " green.")
    assert parse_preference(CONV_PREF, W) == Preference(conv(USER), "It is blue.", "It is green.")


def test_preference_implicit_plain_splits_at_the_word_boundary() -> None:
    pref = parse_preference(PLAIN_IMPLICIT, W)
    assert (pref.prompt.text, pref.chosen, pref.rejected) == ("The sky is", " blue.", " green.")
    assert not pref.prompt.conversational
    # Same pair, explicit or implicit: the same prompt (and so the same id).
    assert pref == parse_preference(PLAIN_PREF, W)


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # Differ inside a word: cut back to the space before it, never split "ap|ples".
        ("I like apples", "I like apricots", ("I like", " apples", " apricots")),
        # One is a prefix of the other: both replies keep at least one word.
        ("The sky is blue", "The sky is blue today", ("The sky is", " blue", " blue today")),
        # Differ right at a space: that space belongs to neither prompt.
        ("The sky is blue", "The sky isn't blue", ("The sky", " is blue", " isn't blue")),
        ("Q: 2+2?\nA: 4", "Q: 2+2?\nA: 5", ("Q: 2+2?\nA:", " 4", " 5")),
        ("Yes.", "No.", None),
        ("Hello there", "Hellx there", None),
    ],
)
def test_split_common_text(chosen: str, rejected: str, expected: tuple | None) -> None:
    assert split_common_text(chosen, rejected) == expected


def test_preference_implicit_conversational() -> None:
    pref = parse_preference(CONV_IMPLICIT, W)
    assert pref == Preference(conv(USER), "It is blue.", "It is green.")
    assert pref == parse_preference(CONV_PREF, W)
    follow = {"role": "user", "content": "And at night?"}
    multi = parse_preference(
        {
            "chosen": [USER, BLUE, follow, {"role": "assistant", "content": "Dark."}],
            "rejected": [USER, BLUE, follow, {"role": "assistant", "content": "Bright."}],
        },
        W,
    )
    assert multi == Preference(conv(USER, BLUE, follow), "Dark.", "Bright.")


def test_preference_with_prompt_column_and_full_conversations() -> None:
    # A plain prompt next to full conversations (a common hub layout): the conversations win.
    record = {"prompt": SKY, "chosen": [USER, BLUE], "rejected": [USER, GREEN], "score": 8}
    pref = parse_preference(record, W)
    assert pref == Preference(conv(USER, score=8), "It is blue.", "It is green.")


def test_preference_margin() -> None:
    assert parse_preference({**PLAIN_PREF, "margin": 2}, W).margin == 2.0
    assert parse_preference({**PLAIN_PREF, "margin": "1.5"}, W).margin == 1.5  # a CSV cell
    assert parse_preference({**PLAIN_PREF, "margin": ""}, W).margin is None  # empty CSV cell
    assert parse_preference({**PLAIN_PREF, "margin": None}, W).margin is None  # Arrow gap


def test_unpaired_plain_and_conversational() -> None:
    assert parse_unpaired(PLAIN_UNPAIRED, W) == Unpaired(plain("The sky is"), " blue.", True)
    assert parse_unpaired(CONV_UNPAIRED, W) == Unpaired(conv(USER), "It is blue.", False)
    assert parse_unpaired({**CONV_MESSAGES, "label": 1}, W) == Unpaired(
        conv(USER), "It is blue.", True
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("False", False),
     ("1", True), ("0", False), (" TRUE ", True)],
)  # fmt: skip
def test_unpaired_label_values(value: Any, expected: bool) -> None:
    assert parse_unpaired({**PLAIN_UNPAIRED, "label": value}, W).label is expected


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        (PLAIN_PROMPT, "prompt"),
        (CONV_PROMPT, "prompt"),
        ({"messages": [USER]}, "prompt"),
        ({"prompt": "Classify: great film", "label": "positive"}, "prompt"),
        (PLAIN_EXAMPLE, "example"),
        (CONV_EXAMPLE, "example"),
        (CONV_MESSAGES, "example"),
        (PLAIN_PREF, "preference"),
        (CONV_PREF, "preference"),
        (PLAIN_IMPLICIT, "preference"),
        (CONV_IMPLICIT, "preference"),
        (PLAIN_UNPAIRED, "unpaired"),
        (CONV_UNPAIRED, "unpaired"),
    ],
)
def test_detect_kind(record: dict[str, Any], kind: str) -> None:
    assert detect_kind(record) == kind


@pytest.mark.parametrize(
    ("record", "parse"),
    [
        (PLAIN_PREF, parse_preference),
        (PLAIN_IMPLICIT, parse_preference),
        (CONV_IMPLICIT, parse_preference),
        (CONV_EXAMPLE, parse_example),
        (CONV_MESSAGES, parse_example),
        (PLAIN_UNPAIRED, parse_unpaired),
        (CONV_UNPAIRED, parse_unpaired),
    ],
)
def test_any_record_serves_as_prompts(record: dict[str, Any], parse: Callable[..., Any]) -> None:
    assert parse_prompt({**record, "answer": "4"}, W) == parse({**record, "answer": "4"}, W).prompt


# --------------------------------------------------------------------------------------------
# columns, ids, meta, round trip
# --------------------------------------------------------------------------------------------


def test_column_mapping() -> None:
    record = {"question": "The sky is", "good": " blue.", "bad": " green.", "strength": 3}
    cols = {"prompt": "question", "chosen": "good", "rejected": "bad", "margin": "strength"}
    assert parse_preference(record, W, cols) == Preference(
        plain("The sky is"), " blue.", " green.", 3.0
    )
    # A literal "prompt" column is just another column once "prompt" is mapped elsewhere.
    prompt = parse_prompt({"q": "Hi there", "prompt": "ignored"}, W, {"prompt": "q"})
    assert prompt.text == "Hi there" and dict(prompt.meta) == {"prompt": "ignored"}
    with pytest.raises(DataError, match=r"^data.jsonl:7: missing field 'bad' \(rejected\)$"):
        parse_preference({"question": "The sky is", "good": " blue."}, W, cols)


@pytest.mark.parametrize(
    ("columns", "key"),
    [
        ({"promt": "q"}, "columns.promt"),
        ({"prompt": ""}, "columns.prompt"),
        ({"chosen": 3}, "columns.chosen"),
    ],
)
def test_bad_column_mapping_names_the_config_key(columns: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        parse_prompt(PLAIN_PROMPT, W, columns)


def test_ids_from_columns_and_derived() -> None:
    assert parse_prompt({**PLAIN_PROMPT, "id": "q-1"}, W).id == "q-1"
    assert parse_prompt({**PLAIN_PROMPT, "id": 17}, W).id == "17"
    assert parse_prompt({**PLAIN_PROMPT, "prompt_id": "p-9"}, W).id == "p-9"
    both = parse_prompt({**PLAIN_PROMPT, "id": "q-1", "prompt_id": "p-9"}, W)
    assert both.id == "q-1" and dict(both.meta) == {"prompt_id": "p-9"}
    assert parse_prompt({"prompt": "x", "uid": "u"}, W, {"id": "uid"}).id == "u"
    assert parse_prompt({**PLAIN_PROMPT, "id": None}, W).id == derive_id(
        plain("The sky is").messages
    )
    # Derived ids are pinned: they name held-out prompts across runs and versions.
    assert parse_prompt(PLAIN_PROMPT, W).id == "ff609f6bdbad3b88"
    assert parse_prompt({"prompt": "The sky is "}, W).id != parse_prompt(PLAIN_PROMPT, W).id
    # Another process (another hash salt) derives the same id.
    code = (
        "from alignkit.data.formats import parse_prompt\n"
        "print(parse_prompt({'prompt': 'The sky is'}, 'x').id)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ff609f6bdbad3b88"


def test_meta_keeps_every_other_column_read_only() -> None:
    record = {**PLAIN_PREF, "answer": "4", "source": {"name": "hh", "turn": 2}, "margin": 1}
    prompt = parse_preference(record, W).prompt
    assert dict(prompt.meta) == {"answer": "4", "source": {"name": "hh", "turn": 2}}
    with pytest.raises(TypeError):
        prompt.meta["answer"] = "5"  # type: ignore[index]
    # A label without a reply is a prompt column (e.g. the class a rule-based reward checks).
    assert dict(parse_prompt({"prompt": "Review: great", "label": "pos"}, W).meta) == {
        "label": "pos"
    }


def test_message_extra_keys_are_kept() -> None:
    tool = {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "weather"}]}
    named = {"role": "user", "content": SKY, "name": "ana"}
    ex = parse_example({"messages": [named, tool, {"role": "user", "content": "So?"}, BLUE]}, W)
    assert ex.prompt.messages == (named, tool, {"role": "user", "content": "So?"})
    # Arrow writes None for a key a message lacks; None is absence, not a value.
    assert parse_prompt({"prompt": [{**USER, "name": None}]}, W).messages == (USER,)


@pytest.mark.parametrize(
    ("record", "parse"),
    [
        ({**PLAIN_PROMPT, "id": "a", "answer": "4"}, parse_prompt),
        ({**CONV_PROMPT, "id": "a"}, parse_prompt),
        (PLAIN_EXAMPLE, parse_example),
        (CONV_EXAMPLE, parse_example),
        ({**PLAIN_PREF, "margin": 1.5}, parse_preference),
        (CONV_PREF, parse_preference),
        (PLAIN_UNPAIRED, parse_unpaired),
        (CONV_UNPAIRED, parse_unpaired),
    ],
)
def test_to_dict_round_trip(record: dict[str, Any], parse: Callable[..., Any]) -> None:
    parsed = parse(record, W)
    assert parse(parsed.to_dict(), W) == parsed
    assert {k: v for k, v in parsed.to_dict().items() if k != "id"} == {
        k: v for k, v in record.items() if k != "id"
    }


# --------------------------------------------------------------------------------------------
# malformed records: the message starts with the location and names the field
# --------------------------------------------------------------------------------------------

BAD: list[tuple[str, Callable[..., Any], Any, str]] = [
    ("not an object", parse_prompt, ["The sky is"], "expected a record (an object), got list"),
    ("no standard field", parse_prompt, {"question": "x"}, "no standard field found"),
    ("missing prompt", parse_example, {"completion": " blue."}, "missing field 'prompt'"),
    (
        "missing completion",
        parse_unpaired,
        {**PLAIN_PROMPT, "label": True},
        "missing field 'completion'",
    ),
    (
        "missing rejected",
        parse_preference,
        {"prompt": "a", "chosen": "b"},
        "missing field 'rejected'",
    ),
    (
        "missing chosen",
        parse_preference,
        {"prompt": "a", "rejected": "b"},
        "missing field 'chosen'",
    ),
    ("missing label", parse_unpaired, PLAIN_EXAMPLE, "missing field 'label'"),
    (
        "prompt type",
        parse_prompt,
        {"prompt": 3},
        "field 'prompt' must be a string or a list of messages, got int",
    ),
    (
        "completion type",
        parse_example,
        {"prompt": "a", "completion": {"x": 1}},
        "field 'completion' must be a string or a list",
    ),
    (
        "messages type",
        parse_prompt,
        {"messages": "hi"},
        "field 'messages' must be a list of messages, got str",
    ),
    (
        "message type",
        parse_prompt,
        {"prompt": ["hi"]},
        "field 'prompt'[0] must be a message object, got str",
    ),
    ("empty prompt", parse_prompt, {"prompt": "  "}, "field 'prompt' is empty"),
    ("empty chosen", parse_preference, {**PLAIN_PREF, "chosen": ""}, "field 'chosen' is empty"),
    ("empty messages", parse_prompt, {"messages": []}, "field 'messages' is empty"),
    (
        "empty content",
        parse_prompt,
        {"prompt": [{"role": "user", "content": ""}]},
        "field 'prompt'[0] 'content' is empty",
    ),
    (
        "unknown role",
        parse_prompt,
        {"messages": [USER, {"role": "bot", "content": "x"}, USER]},
        "field 'messages'[1] has unknown role 'bot'",
    ),
    ("no role", parse_prompt, {"prompt": [{"content": "x"}]}, "field 'prompt'[0] has no 'role'"),
    (
        "no content",
        parse_prompt,
        {"prompt": [USER, {"role": "user"}]},
        "field 'prompt'[1] has no 'content'",
    ),
    (
        "content type",
        parse_prompt,
        {"prompt": [{"role": "user", "content": ["x"]}]},
        "field 'prompt'[0] 'content' must be a string, got list",
    ),
    (
        "completion is user",
        parse_example,
        {"prompt": [USER], "completion": [USER]},
        "field 'completion' must hold exactly one assistant message, got roles ['user']",
    ),
    (
        "two completions",
        parse_unpaired,
        {**CONV_UNPAIRED, "completion": [BLUE, GREEN]},
        "field 'completion' must hold exactly one assistant message",
    ),
    (
        "chosen not assistant",
        parse_preference,
        {**CONV_PREF, "chosen": [{"role": "system", "content": "x"}, BLUE]},
        "field 'chosen' must hold exactly one assistant message, got roles ['system', 'assistant']",
    ),
    (
        "messages without reply",
        parse_example,
        {"messages": [USER]},
        "field 'messages' must end with an assistant message",
    ),
    (
        "prompt ends with reply",
        parse_prompt,
        {"prompt": [USER, BLUE]},
        "field 'prompt': the prompt ends with an assistant message",
    ),
    (
        "prompt without user",
        parse_prompt,
        {"prompt": [{"role": "system", "content": "x"}]},
        "field 'prompt': the prompt has no user message",
    ),
    (
        "implicit no prefix",
        parse_preference,
        {"chosen": "Yes.", "rejected": "No."},
        "fields 'chosen' and 'rejected' have no common prefix",
    ),
    (
        "implicit identical",
        parse_preference,
        {"chosen": "The sky.", "rejected": "The sky."},
        "fields 'chosen' and 'rejected' are identical",
    ),
    (
        "implicit conv no prefix",
        parse_preference,
        {"chosen": [USER, BLUE], "rejected": [{"role": "user", "content": "Hi"}, GREEN]},
        "fields 'chosen' and 'rejected' have no common prefix",
    ),
    (
        "implicit conv identical",
        parse_preference,
        {"chosen": [USER, BLUE], "rejected": [USER, BLUE]},
        "fields 'chosen' and 'rejected' are identical",
    ),
    (
        "implicit mixed types",
        parse_preference,
        {"chosen": "The sky is blue.", "rejected": [USER, GREEN]},
        "fields 'chosen' and 'rejected' must both be strings or both be lists",
    ),
    (
        "replies without prompt",
        parse_preference,
        {"chosen": [BLUE], "rejected": [GREEN]},
        "missing field 'prompt' (fields 'chosen' and 'rejected' hold only assistant replies)",
    ),
    (
        "margin text",
        parse_preference,
        {**PLAIN_PREF, "margin": "high"},
        "field 'margin' must be a number, got 'high'",
    ),
    (
        "margin bool",
        parse_preference,
        {**PLAIN_PREF, "margin": True},
        "field 'margin' must be a number, got bool",
    ),
    (
        "margin negative",
        parse_preference,
        {**PLAIN_PREF, "margin": -1},
        "field 'margin' must be a finite number >= 0, got -1",
    ),
    (
        "margin nan",
        parse_preference,
        {**PLAIN_PREF, "margin": float("nan")},
        "field 'margin' must be a finite number >= 0",
    ),
    (
        "label text",
        parse_unpaired,
        {**PLAIN_UNPAIRED, "label": "yes"},
        "field 'label' must be a boolean (true/false or 0/1), got 'yes'",
    ),
    (
        "label int",
        parse_unpaired,
        {**PLAIN_UNPAIRED, "label": 2},
        "field 'label' must be a boolean (true/false or 0/1), got 2",
    ),
    (
        "id type",
        parse_prompt,
        {**PLAIN_PROMPT, "id": [1]},
        "field 'id' must be a string or an integer, got list",
    ),
    ("id empty", parse_prompt, {**PLAIN_PROMPT, "prompt_id": " "}, "field 'prompt_id' is empty"),
]


@pytest.mark.parametrize(
    ("parse", "record", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_malformed_record_names_location_and_field(
    parse: Callable[..., Any], record: Any, message: str
) -> None:
    with pytest.raises(DataError) as info:
        parse(record, W)
    text = str(info.value)
    assert text.startswith(f"{W}: "), text
    assert message in text, text
