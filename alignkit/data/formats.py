"""The standard dataset formats, plain-text and conversational, parsed from one raw record.

A record is one row of a user's data (a JSON object, a Parquet/CSV row, a ``datasets`` row).
The formats are the ones the ecosystem shares (TRL's dataset-format guide uses the same names):

=================  ==========================================  ===============================
kind               plain text                                  conversational
=================  ==========================================  ===============================
prompt             ``{"prompt": str}``                         ``{"prompt": [msg, ...]}`` or
                                                               ``{"messages": [msg, ...]}``
example (SFT)      ``{"prompt": str, "completion": str}``      ``{"prompt": [...],
                                                               "completion": [assistant msg]}``
                                                               or ``{"messages": [..., asst]}``
preference         ``{"prompt", "chosen", "rejected"}``        the same with message lists
  implicit prompt  ``{"chosen": full text, "rejected": ...}``  ``{"chosen": full conversation,
                                                               "rejected": full conversation}``
unpaired (KTO)     ``{"prompt", "completion", "label"}``       the same with message lists
=================  ==========================================  ===============================

A message is ``{"role": "system" | "user" | "assistant", "content": str}``; other keys (for
example ``name`` or ``tool_calls``) are kept as given. Preferences may carry a numeric
``margin`` (>= 0, the preference strength). Every column that is not one of these fields is
kept, untouched, in :attr:`Prompt.meta` (for example ``answer`` for a rule-based reward).

``columns`` maps canonical field names to the user's column names, e.g.
``{"prompt": "question", "chosen": "good"}``; a field it does not name keeps its own name.

Every malformed record raises :class:`~alignkit.errors.DataError` whose message starts with the
record's location (``where``, e.g. ``data.jsonl:12``) and names the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from alignkit.errors import ConfigError, DataError

Message = dict[str, str]
"""``{"role": "system" | "user" | "assistant", "content": str}`` plus any extra keys."""

ROLES: tuple[str, ...] = ("system", "user", "assistant")
FIELDS: tuple[str, ...] = (
    "id",
    "prompt_id",
    "prompt",
    "messages",
    "completion",
    "chosen",
    "rejected",
    "margin",
    "label",
)
"""Canonical field names; the keys ``columns`` may map to the user's column names."""

KINDS: tuple[str, ...] = ("preference", "unpaired", "example", "prompt")

# The fields each kind consumes; every other column of the record goes to Prompt.meta. Both
# prompt sources count for every kind, so a record holding a ``prompt`` copy next to its
# ``messages`` (a common layout) does not leak a second prompt into meta.
_STRUCTURE: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt", "messages"),
    "example": ("prompt", "messages", "completion"),
    "unpaired": ("prompt", "messages", "completion", "label"),
    "preference": ("prompt", "messages", "chosen", "rejected", "margin"),
}
_ID_FIELDS = ("id", "prompt_id")
_TRUE = ("true", "1")
_FALSE = ("false", "0")

# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """The conversation a model is asked to continue."""

    id: str
    """The record's ``id`` (else ``prompt_id``) column, else :func:`derive_id` of the messages."""
    messages: tuple[Message, ...]
    """The conversation before the reply; holds a user message, never ends with an assistant."""
    conversational: bool
    """False when the source gave a plain string: then ``messages == ({"role": "user", ...},)``."""
    meta: Mapping[str, Any]
    """Every other column of the record, untouched (read-only)."""

    @property
    def text(self) -> str:
        """The content of the last user message (the whole prompt for plain text)."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "user")

    def to_dict(self) -> dict[str, Any]:
        """The standard form back: ``{"id", "prompt": str or list of messages, **meta}``.

        ``id`` and ``prompt`` win over meta columns of the same name (possible only when
        ``columns`` mapped those fields to other columns).
        """
        prompt: str | list[Message] = (
            [dict(m) for m in self.messages] if self.conversational else self.text
        )
        rest = {k: v for k, v in self.meta.items() if k not in ("id", "prompt")}
        return {"id": self.id, "prompt": prompt, **rest}

    def _completion_form(self, text: str) -> str | list[Message]:
        # A conversational record writes its completion as TRL does: one assistant message.
        return [{"role": "assistant", "content": text}] if self.conversational else text


@dataclass(frozen=True)
class Example:
    """An SFT demonstration: the loss is on ``completion`` only."""

    prompt: Prompt
    completion: str
    """The assistant reply text."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.prompt.to_dict(),
            "completion": self.prompt._completion_form(self.completion),
        }


@dataclass(frozen=True)
class Preference:
    """``chosen`` was preferred over ``rejected`` as a reply to ``prompt``."""

    prompt: Prompt
    chosen: str
    rejected: str
    margin: float | None = None
    """Preference strength (>= 0), as in the Llama 2 margin loss; None when not given."""

    def to_dict(self) -> dict[str, Any]:
        out = self.prompt.to_dict()
        out["chosen"] = self.prompt._completion_form(self.chosen)
        out["rejected"] = self.prompt._completion_form(self.rejected)
        if self.margin is not None:
            out["margin"] = self.margin
        return out


@dataclass(frozen=True)
class Unpaired:
    """A single reply labelled desirable (True) or undesirable (False), as KTO uses."""

    prompt: Prompt
    completion: str
    label: bool

    def to_dict(self) -> dict[str, Any]:
        out = self.prompt.to_dict()
        out["completion"] = self.prompt._completion_form(self.completion)
        out["label"] = self.label
        return out


def derive_id(messages: Sequence[Mapping[str, Any]]) -> str:
    """A stable id for a prompt: 16 hex digits of the SHA-256 of its canonical JSON.

    Python's ``hash`` is salted per process; SHA-256 of sorted-key JSON gives the same id for
    the same content in every process, so held-out splits and caches agree across runs.
    """
    blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# field access
# --------------------------------------------------------------------------------------------


def check_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    """Validate ``columns`` (canonical field -> user column); a ConfigError names the key."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise ConfigError(f"columns: expected a mapping of field -> column, got {columns!r}")
    out = {}
    for field, column in columns.items():
        if field not in FIELDS:
            raise ConfigError(f"columns.{field}: unknown field; known fields: {', '.join(FIELDS)}")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"columns.{field}: expected a column name, got {column!r}")
        out[field] = column
    return out


class _Record:
    """One raw record seen through ``columns``; every error starts with ``where``."""

    def __init__(self, raw: Mapping[str, Any], where: str, columns: Mapping[str, str] | None):
        if not isinstance(raw, Mapping):
            raise DataError(f"{where}: expected a record (an object), got {type(raw).__name__}")
        self.raw, self.where, self.columns = raw, where, check_columns(columns)

    def col(self, field: str) -> str:
        return self.columns.get(field, field)

    def name(self, field: str) -> str:
        """The field as the user knows it, with the canonical name when ``columns`` renamed it."""
        col = self.col(field)
        return repr(col) if col == field else f"{col!r} ({field})"

    def has(self, field: str) -> bool:
        # Arrow fills a column a row lacks with None: None means absent.
        return self.raw.get(self.col(field)) is not None

    def get(self, field: str) -> Any:
        if not self.has(field):
            raise self.error(f"missing field {self.name(field)}")
        return self.raw[self.col(field)]

    def error(self, problem: str) -> DataError:
        return DataError(f"{self.where}: {problem}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def _text(rec: _Record, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise rec.error(f"field {rec.name(field)} must be a string, got {_type_name(value)}")
    if not value.strip():
        raise rec.error(f"field {rec.name(field)} is empty")
    return value


def _message(rec: _Record, field: str, index: int, value: Any) -> Message:
    label = f"field {rec.name(field)}[{index}]"
    if not isinstance(value, Mapping):
        raise rec.error(f"{label} must be a message object, got {_type_name(value)}")
    role = value.get("role")
    if role is None:
        raise rec.error(f"{label} has no 'role'")
    if role not in ROLES:
        raise rec.error(f"{label} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
    content = value.get("content")
    if content is None:
        raise rec.error(f"{label} has no 'content'")
    if not isinstance(content, str):
        raise rec.error(f"{label} 'content' must be a string, got {_type_name(content)}")
    if not content.strip():
        raise rec.error(f"{label} 'content' is empty")
    # Extra keys stay as given, except the None that Arrow writes for a key other messages of
    # the column have: dropping it makes a Parquet row equal to the JSON line it came from.
    return {k: v for k, v in value.items() if v is not None}


def _messages(rec: _Record, field: str, value: Any) -> list[Message]:
    if not isinstance(value, list | tuple):
        raise rec.error(
            f"field {rec.name(field)} must be a list of messages, got {_type_name(value)}"
        )
    if not value:
        raise rec.error(f"field {rec.name(field)} is empty")
    return [_message(rec, field, i, m) for i, m in enumerate(value)]


def _is_message_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], Mapping)


def _check_prompt_messages(
    rec: _Record, field: str, messages: Sequence[Message], what: str
) -> None:
    if not messages:
        raise rec.error(f"field {rec.name(field)}: {what} is empty")
    if messages[-1]["role"] == "assistant":
        raise rec.error(f"field {rec.name(field)}: {what} ends with an assistant message")
    if not any(m["role"] == "user" for m in messages):
        raise rec.error(f"field {rec.name(field)}: {what} has no user message")


def _completion(rec: _Record, field: str) -> str:
    """A reply: a string, or (conversational) a list holding exactly one assistant message."""
    value = rec.get(field)
    if isinstance(value, str):
        return _text(rec, field, value)
    if not isinstance(value, list | tuple):
        raise rec.error(
            f"field {rec.name(field)} must be a string or a list holding one assistant message, "
            f"got {_type_name(value)}"
        )
    messages = _messages(rec, field, value)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise rec.error(
            f"field {rec.name(field)} must hold exactly one assistant message, got roles {roles}"
        )
    return messages[0]["content"]


def _prompt_id(rec: _Record) -> str | None:
    for field in _ID_FIELDS:
        if rec.has(field):
            value = rec.get(field)
            # bool is an int subclass, but true/false is never an id.
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise rec.error(
                    f"field {rec.name(field)} must be a string or an integer, "
                    f"got {_type_name(value)}"
                )
            if not str(value).strip():
                raise rec.error(f"field {rec.name(field)} is empty")
            return str(value)
    return None


def _make_prompt(
    rec: _Record, kind: str, messages: Sequence[Message], conversational: bool
) -> Prompt:
    given = _prompt_id(rec)
    consumed = {rec.col(f) for f in _STRUCTURE[kind]}
    if given is not None:
        consumed.add(rec.col(next(f for f in _ID_FIELDS if rec.has(f))))
    meta = {k: v for k, v in rec.raw.items() if k not in consumed}
    return Prompt(
        id=given if given is not None else derive_id(messages),
        messages=tuple(messages),
        conversational=conversational,
        meta=MappingProxyType(meta),
    )


def _explicit_prompt(rec: _Record, kind: str) -> Prompt:
    """The ``prompt`` field: a string or a list of messages."""
    value = rec.get("prompt")
    if isinstance(value, str):
        text = _text(rec, "prompt", value)
        return _make_prompt(rec, kind, [{"role": "user", "content": text}], conversational=False)
    if not isinstance(value, list | tuple):
        raise rec.error(
            f"field {rec.name('prompt')} must be a string or a list of messages, "
            f"got {_type_name(value)}"
        )
    messages = _messages(rec, "prompt", value)
    _check_prompt_messages(rec, "prompt", messages, "the prompt")
    return _make_prompt(rec, kind, messages, conversational=True)


def _split_conversation(rec: _Record, kind: str) -> tuple[Prompt, str]:
    """``messages`` ending with an assistant reply -> (prompt of the earlier turns, reply)."""
    messages = _messages(rec, "messages", rec.get("messages"))
    if messages[-1]["role"] != "assistant":
        raise rec.error(
            f"field {rec.name('messages')} must end with an assistant message (the completion)"
        )
    _check_prompt_messages(rec, "messages", messages[:-1], "the turns before the last reply")
    return _make_prompt(rec, kind, messages[:-1], conversational=True), messages[-1]["content"]


def _prompt_and_completion(rec: _Record, kind: str) -> tuple[Prompt, str]:
    if rec.has("completion"):
        return _explicit_prompt(rec, kind), _completion(rec, "completion")
    if rec.has("messages"):
        return _split_conversation(rec, kind)
    raise rec.error(f"missing field {rec.name('completion')} (or {rec.name('messages')})")


# --------------------------------------------------------------------------------------------
# implicit prompts
# --------------------------------------------------------------------------------------------


def split_common_text(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen tail, rejected tail)`` of two full texts, or None without a prompt.

    The prompt is their longest common prefix cut back to the last whitespace both share
    before the first difference, so each tail starts with that whitespace and a whole word:
    ``"The sky is blue."`` / ``"The sky is green."`` -> ``("The sky is", " blue.", " green.")``.
    TRL's ``extract_prompt`` gives the same split when the texts differ right after a space;
    cutting back further also keeps ``"... apples"`` / ``"... apricots"`` from splitting a word.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    # A boundary strictly before n is shared by both texts, and leaves both tails non-empty.
    cut = next((p for p in range(n - 1, 0, -1) if chosen[p].isspace()), 0)
    prompt = chosen[:cut]
    if not prompt.strip():
        return None
    return prompt, chosen[cut:], rejected[cut:]


def _implicit_preference(rec: _Record) -> tuple[Prompt, str, str]:
    """Prompt = the common prefix of full ``chosen`` and ``rejected`` texts or conversations."""
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if chosen == rejected:
        raise rec.error(f"fields {rec.name('chosen')} and {rec.name('rejected')} are identical")
    pair = f"fields {rec.name('chosen')} and {rec.name('rejected')}"
    if isinstance(chosen, str) and isinstance(rejected, str):
        split = split_common_text(_text(rec, "chosen", chosen), _text(rec, "rejected", rejected))
        if split is None:
            raise rec.error(f"{pair} have no common prefix (the implicit prompt)")
        prompt, c, r = split
        for field, tail in (("chosen", c), ("rejected", r)):
            if not tail.strip():
                raise rec.error(f"field {rec.name(field)} has no reply after the common prefix")
        message = {"role": "user", "content": prompt}
        return _make_prompt(rec, "preference", [message], conversational=False), c, r
    if not (_is_full_conversation(chosen) or _is_full_conversation(rejected)) and (
        _is_message_list(chosen) or _is_message_list(rejected)
    ):
        # Replies alone (no user turn) cannot hold an implicit prompt: the prompt is missing.
        raise rec.error(f"missing field {rec.name('prompt')} ({pair} hold only assistant replies)")
    if not (_is_message_list(chosen) and _is_message_list(rejected)):
        raise rec.error(
            f"{pair} must both be strings or both be lists of messages when there is no "
            f"{rec.name('prompt')}; got {_type_name(chosen)} and {_type_name(rejected)}"
        )
    c_msgs, r_msgs = _messages(rec, "chosen", chosen), _messages(rec, "rejected", rejected)
    n = 0
    while n < min(len(c_msgs), len(r_msgs)) and c_msgs[n] == r_msgs[n]:
        n += 1
    if n == 0:
        raise rec.error(f"{pair} have no common prefix (the implicit prompt)")
    _check_prompt_messages(rec, "chosen", c_msgs[:n], "the common prefix of chosen and rejected")
    prompt = _make_prompt(rec, "preference", c_msgs[:n], conversational=True)
    return prompt, _tail_reply(rec, "chosen", c_msgs[n:]), _tail_reply(rec, "rejected", r_msgs[n:])


def _tail_reply(rec: _Record, field: str, tail: Sequence[Message]) -> str:
    if len(tail) != 1 or tail[0]["role"] != "assistant":
        raise rec.error(
            f"field {rec.name(field)} must continue the common prefix with exactly one assistant "
            f"message, got roles {[m['role'] for m in tail]}"
        )
    return tail[0]["content"]


def _is_full_conversation(value: Any) -> bool:
    """A message list that holds more than replies (it repeats the prompt's turns)."""
    return _is_message_list(value) and any(
        isinstance(m, Mapping) and m.get("role") != "assistant" for m in value
    )


# --------------------------------------------------------------------------------------------
# scalars
# --------------------------------------------------------------------------------------------


def _margin(rec: _Record) -> float | None:
    if not rec.has("margin"):
        return None
    value = rec.get("margin")
    if isinstance(value, str):  # CSV cells are strings; an empty cell is an absent margin
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise rec.error(f"field {rec.name('margin')} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise rec.error(f"field {rec.name('margin')} must be a number, got {_type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise rec.error(f"field {rec.name('margin')} must be a finite number >= 0, got {value!r}")
    return float(value)


def _label(rec: _Record) -> bool:
    value = rec.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise rec.error(
        f"field {rec.name('label')} must be a boolean (true/false or 0/1), got {value!r}"
    )


# --------------------------------------------------------------------------------------------
# public parsers
# --------------------------------------------------------------------------------------------


def detect_kind(
    raw: Mapping[str, Any], *, where: str = "record", columns: Mapping[str, str] | None = None
) -> str:
    """The record's kind: ``"preference"``, ``"unpaired"``, ``"example"`` or ``"prompt"``.

    ``chosen``/``rejected`` -> preference; ``label`` with a reply -> unpaired; ``completion``, or
    ``messages`` ending with an assistant message -> example; ``prompt`` or ``messages`` -> prompt.
    A ``label`` without a reply stays a prompt column (e.g. a class for a rule-based reward).
    """
    rec = _Record(raw, where, columns)
    messages = rec.raw.get(rec.col("messages"))
    ends_with_reply = (
        isinstance(messages, list | tuple)
        and bool(messages)
        and isinstance(messages[-1], Mapping)
        and messages[-1].get("role") == "assistant"
    )
    has_reply = rec.has("completion") or ends_with_reply
    if rec.has("chosen") or rec.has("rejected"):
        return "preference"
    if rec.has("label") and has_reply:
        return "unpaired"
    if has_reply:
        return "example"
    if rec.has("prompt") or rec.has("messages"):
        return "prompt"
    fields = ", ".join(repr(rec.col(f)) for f in ("prompt", "messages", "chosen", "completion"))
    raise rec.error(f"no standard field found; expected one of {fields}")


def parse_prompt(
    raw: Mapping[str, Any], where: str, columns: Mapping[str, str] | None = None
) -> Prompt:
    """The prompt of any standard record (prompt-only, SFT, preference or unpaired).

    ``{"messages": [...]}`` gives the conversation before its last assistant turn, or all of it
    when it does not end with one. A preference, SFT or unpaired record gives the same
    :class:`Prompt` (id and meta included) as its own parser, so any such file serves as prompts.
    """
    kind = detect_kind(raw, where=where, columns=columns)
    if kind == "preference":
        return parse_preference(raw, where, columns).prompt
    if kind == "unpaired":
        return parse_unpaired(raw, where, columns).prompt
    if kind == "example":
        return parse_example(raw, where, columns).prompt
    rec = _Record(raw, where, columns)
    if rec.has("prompt"):
        return _explicit_prompt(rec, "prompt")
    messages = _messages(rec, "messages", rec.get("messages"))
    _check_prompt_messages(rec, "messages", messages, "the conversation")
    return _make_prompt(rec, "prompt", messages, conversational=True)


def parse_example(
    raw: Mapping[str, Any], where: str, columns: Mapping[str, str] | None = None
) -> Example:
    """An SFT demonstration: ``prompt`` + ``completion``, or ``messages`` ending with the reply."""
    rec = _Record(raw, where, columns)
    prompt, completion = _prompt_and_completion(rec, "example")
    return Example(prompt=prompt, completion=completion)


def parse_preference(
    raw: Mapping[str, Any], where: str, columns: Mapping[str, str] | None = None
) -> Preference:
    """A preference pair with an explicit ``prompt`` or one implicit in ``chosen``/``rejected``.

    When ``chosen``/``rejected`` are full conversations (they hold the prompt's turns too), the
    prompt is their shared leading messages and a ``prompt`` column is ignored, as TRL does for
    datasets that carry both (e.g. a plain ``prompt`` next to conversational pairs).
    """
    rec = _Record(raw, where, columns)
    chosen_raw, rejected_raw = rec.get("chosen"), rec.get("rejected")
    full = _is_full_conversation(chosen_raw) and _is_full_conversation(rejected_raw)
    if rec.has("prompt") and not full:
        prompt = _explicit_prompt(rec, "preference")
        chosen, rejected = _completion(rec, "chosen"), _completion(rec, "rejected")
    else:
        prompt, chosen, rejected = _implicit_preference(rec)
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected, margin=_margin(rec))


def parse_unpaired(
    raw: Mapping[str, Any], where: str, columns: Mapping[str, str] | None = None
) -> Unpaired:
    """A KTO-style record: ``prompt`` + ``completion`` (or ``messages``) and a boolean ``label``."""
    rec = _Record(raw, where, columns)
    prompt, completion = _prompt_and_completion(rec, "unpaired")
    return Unpaired(prompt=prompt, completion=completion, label=_label(rec))
