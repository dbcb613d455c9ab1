"""Prompt rendering: a tokenizer's chat template, or alignkit's plain ``User:/Assistant:`` form.

Every place that turns a conversation into tokens goes through :class:`PromptFormat`: SFT
(prompt and response apart, the loss on the assistant turn only), the rollout and evaluation
samplers, feedback sampling, the reward model (training and scoring) and the judge. Each model
renders with its *own* tokenizer, so a reward model with another tokenizer and template scores
the policy's conversations re-rendered in its own format (the N implementation details of
RLHF, Huang et al. 2024, detail 12: decode to text, re-encode).

Modes (``task.template``):

* ``chat``: ``tokenizer.apply_chat_template``; the prompt ends with the generation prompt
  (``add_generation_prompt=True``) and the response is what the template adds for the
  assistant turn, up to and including its end-of-turn token (e.g. ``<|im_end|>``).
* ``plain``: ``"User: ...\\nAssistant:"`` turns (``"System: ...\\n"`` first), the response
  ``" " + text + EOS``; the built-in task's format.
* ``auto`` (default): ``chat`` when the tokenizer has a chat template, else ``plain``.
* ``raw``: a plain-text prompt is used verbatim (as TRL treats its standard, non-conversational
  datasets); conversations are rendered as under ``auto``.

A prompt given as a ``str`` instead of a message list is *verbatim* text (already rendered, as
in ``{"prompt": ..., "response": ...}`` demonstration files): it is used as is in every mode,
and its response is ``" " + text + EOS``.

Special tokens are handled one way everywhere: a rendered chat template carries its own BOS,
so it is tokenised with ``add_special_tokens=False``; a plain prompt gets what the tokenizer
adds by default (BOS for Llama-style tokenizers, nothing for GPT-2's); a response never gets
special tokens added. Prompt and response are tokenised apart, so the response tokens the
policy is trained on are the tokens it samples after the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignkit.errors import ConfigError, DataError

__all__ = [
    "TEMPLATE_MODES",
    "Conversation",
    "Message",
    "PromptFormat",
    "plain_prompt",
    "stop_token_ids",
    "user_turn",
]

TEMPLATE_MODES: tuple[str, ...] = ("auto", "chat", "plain", "raw")
Message = Mapping[str, Any]
"""``{"role": "system" | "user" | "assistant", "content": str}``."""
Conversation = Sequence[Message] | str
"""A prompt: the messages before the reply, or verbatim text."""

# A probe reply to find the tokens a template puts after an assistant turn's content.
_PROBE = "alignkit probe reply"
_PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def user_turn(text: str) -> list[dict[str, str]]:
    """A one-turn conversation: ``[{"role": "user", "content": text}]``."""
    return [{"role": "user", "content": text}]


def plain_prompt(messages: Sequence[Message]) -> str:
    """``"User: a\\nAssistant: b\\nUser: c\\nAssistant:"``: the plain rendering of a prompt."""
    lines = []
    for m in messages:
        role = _PLAIN_ROLES.get(str(m.get("role")))
        if role is None:
            known = ", ".join(_PLAIN_ROLES)
            raise DataError(f"unknown message role {m.get('role')!r}; known roles: {known}")
        content = str(m.get("content", "")).strip()
        lines.append(f"{role}: {content}")
    return "\n".join([*lines, "Assistant:"])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(tokenizer: Any, model: Any = None) -> tuple[int, ...]:
    """Token ids that end a response: the union of the tokenizer's EOS, the model's
    ``generation_config.eos_token_id`` (an int or a list, as instruct models mark end of turn)
    and, for a tokenizer with a chat template, the template's end-of-turn token.

    The EOS comes first: it is what a plain response is closed with.
    """
    ids = _as_list(getattr(tokenizer, "eos_token_id", None))
    gen = getattr(model, "generation_config", None) if model is not None else None
    ids += _as_list(getattr(gen, "eos_token_id", None))
    ids += list(_template_stops(tokenizer))
    return tuple(dict.fromkeys(ids))


def _template_stops(tokenizer: Any) -> tuple[int, ...]:
    """The first special token a chat template emits right after an assistant reply."""
    if not has_chat_template(tokenizer):
        return ()
    suffix = _chat_suffix(tokenizer, user_turn("hi"), _PROBE, "task.template")
    after = suffix[suffix.find(_PROBE) + len(_PROBE) :] if _PROBE in suffix else ""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    return tuple(t for t in _ids(tokenizer, after, special=False) if t in special)[:1]


def _chat_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )


def _chat_suffix(tokenizer: Any, messages: Sequence[Message], response: str, key: str) -> str:
    prompt = _chat_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*(dict(m) for m in messages), {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not full.startswith(prompt):
        raise ConfigError(
            f"{key}: the tokenizer's chat template renders a conversation with a reply that "
            "does not start with the same conversation's generation prompt, so the reply "
            f"cannot be cut from it; use {key}=plain"
        )
    return full[len(prompt) :]


@dataclass
class PromptFormat:
    """How one model (through its tokenizer) reads conversations.

    Args:
        tokenizer: the model's tokenizer.
        mode: ``auto``, ``chat``, ``plain`` or ``raw`` (see the module docstring).
        key: the config key named in errors.
        model: optional; its ``generation_config`` adds stop ids.
    """

    tokenizer: Any
    mode: str = "auto"
    key: str = "task.template"
    model: Any = None
    raw_text: bool = field(default=False, init=False)
    """``raw`` mode: plain-text prompts stay verbatim."""
    _stops: tuple[int, ...] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in TEMPLATE_MODES:
            raise ConfigError(
                f"{self.key}={self.mode!r}; expected one of {', '.join(TEMPLATE_MODES)}"
            )
        if self.mode == "chat" and not has_chat_template(self.tokenizer):
            raise ConfigError(
                f"{self.key}=chat but the tokenizer has no chat template; use "
                f"{self.key}=plain or auto, or give the tokenizer a chat_template"
            )
        self.raw_text = self.mode == "raw"
        if self.mode in ("auto", "raw"):
            self.mode = "chat" if has_chat_template(self.tokenizer) else "plain"

    @property
    def chat(self) -> bool:
        return self.mode == "chat"

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops at (EOS first; computed once)."""
        if self._stops is None:
            self._stops = stop_token_ids(self.tokenizer, self.model)
        return self._stops

    # -- text

    def prompt_text(self, messages: Conversation) -> str:
        """The prompt as the model sees it, ending where the assistant's reply begins."""
        if isinstance(messages, str):
            return messages
        return _chat_prompt(self.tokenizer, messages) if self.chat else plain_prompt(messages)

    def response_suffix(self, messages: Sequence[Message], response: str) -> str:
        """What the chat template adds after :meth:`prompt_text` for the assistant's reply."""
        if isinstance(messages, str):
            raise TypeError("a verbatim prompt has no chat-template suffix")
        return _chat_suffix(self.tokenizer, messages, response, self.key)

    # -- tokens

    def templated(self, messages: Conversation) -> bool:
        """Whether ``messages`` go through the chat template (not verbatim, chat mode)."""
        return self.chat and not isinstance(messages, str)

    def encode_prompt(self, messages: Conversation) -> list[int]:
        """Prompt token ids (the template's own BOS in chat mode; the tokenizer's default
        special tokens otherwise)."""
        return _ids(
            self.tokenizer, self.prompt_text(messages), special=not self.templated(messages)
        )

    def encode_response(self, messages: Conversation, response: str) -> list[int]:
        """Response token ids, closed by the end-of-turn token (chat) or EOS (plain).

        Chat: the template's assistant suffix, tokenised on its own, cut after its first stop
        token (a trailing newline after ``<|im_end|>`` is not part of the reply); EOS is
        appended if the template closes the turn with no stop token.
        """
        eos = _as_list(self.tokenizer.eos_token_id)[:1]
        if not self.templated(messages):
            text = " " + response.strip() if response.strip() else ""
            return _ids(self.tokenizer, text, special=False) + eos
        assert not isinstance(messages, str)
        ids = _ids(self.tokenizer, self.response_suffix(messages, response), special=False)
        stops = set(self.stop_ids)
        for i, t in enumerate(ids):
            if t in stops:
                return ids[: i + 1]
        return ids + eos

    def encode_prompts(self, prompts: Sequence[Conversation]) -> list[list[int]]:
        """:meth:`encode_prompt` of every row in at most two batched tokenizer calls (rows
        rendered by the chat template, and the others)."""
        out: list[list[int]] = [[] for _ in prompts]
        for templated in (True, False):
            rows = [i for i, p in enumerate(prompts) if self.templated(p) == templated]
            if rows:
                texts = [self.prompt_text(prompts[i]) for i in rows]
                ids = self.tokenizer(texts, add_special_tokens=not templated)["input_ids"]
                for i, row in zip(rows, ids, strict=True):
                    out[i] = list(row)
        return out

    def encode_responses(
        self, prompts: Sequence[Conversation], responses: Sequence[str]
    ) -> list[list[int]]:
        """:meth:`encode_response` of every row; the rows that need no template are tokenised
        in one batched call (what the reward model scores every RL step)."""
        out: list[list[int] | None] = [None] * len(responses)
        plain = [i for i, p in enumerate(prompts) if not self.templated(p)]
        if plain:
            eos = _as_list(self.tokenizer.eos_token_id)[:1]
            texts = [" " + responses[i].strip() if responses[i].strip() else "" for i in plain]
            ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            for i, row in zip(plain, ids, strict=True):
                out[i] = list(row) + eos
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            if out[i] is None:
                out[i] = self.encode_response(prompt, response)
        return [row for row in out if row is not None]

    def encode(self, messages: Conversation, response: str) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of one conversation and reply."""
        return self.encode_prompt(messages), self.encode_response(messages, response)
