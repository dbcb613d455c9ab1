"""The judge interface: one protocol for every backend, and what a judgement holds.

A backend turns judge contexts (rendered templates ending in ``"Critique:"``) into a critique
and the verdict options' log-probs after ``critique + verdict prefix``, and completes texts
(for revisions). Everything above that (templates, principles, weights, pairwise debiasing,
parsed fallbacks, error policy) lives in :class:`alignkit.judges.critic.CritiqueJudge` and is
shared by the local and HTTP backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from alignkit.errors import AlignkitError

__all__ = ["JudgeBackend", "JudgeError", "Judgement", "RawVerdict", "cut_critique"]


class JudgeError(AlignkitError):
    """The judge failed (unreachable, timed out, answered garbage, no readable verdict)."""


@dataclass
class RawVerdict:
    """What a backend returns for one context.

    Attributes:
        critique: the generated critique, cut before the verdict prefix (leading space kept).
        option_logprobs: verdict option -> log-probability after ``critique + verdict``; None
            when the backend exposes no log-probs (the verdict is then parsed from ``text``).
        text: everything the judge generated (critique, verdict, whatever followed).
    """

    critique: str
    option_logprobs: dict[str, float] | None
    text: str


@dataclass
class Judgement:
    """The reward for one (prompt, response) and how it was obtained.

    ``source`` is ``logprobs`` (expected verdict value under the judge's log-probs),
    ``parsed`` (read from the text) or ``fallback`` (the judge failed and the configured
    fallback value was used; ``error`` says why).
    """

    score: float
    critique: str
    source: str
    principles: dict[str, float] = field(default_factory=dict)
    """Per-principle scores when judged principle by principle."""
    critiques: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@runtime_checkable
class JudgeBackend(Protocol):
    """A judge language model behind some interface (in-process or over HTTP)."""

    name: str

    def critique(
        self, contexts: Sequence[str], verdict_prefix: str, options: Sequence[str]
    ) -> list[RawVerdict | JudgeError]:
        """Critique each context, then read the verdict options' log-probs.

        One entry per context, in order; a failure for one context is returned as its
        :class:`JudgeError` (so the rest of the batch is kept), never as a made-up verdict.
        """
        ...

    def complete(self, contexts: Sequence[str], max_tokens: int) -> list[str | JudgeError]:
        """Greedy continuation of each context, up to the end of its line."""
        ...

    def close(self) -> None:
        """Release connections, threads or memory."""
        ...


def cut_critique(text: str, verdict_prefix: str) -> str:
    """The critique part of a generation: up to the verdict marker, else the first line.

    ``" Wrong sum.\\nVerdict: bad"`` with prefix ``"\\nVerdict:"`` -> ``" Wrong sum."``.
    Trailing whitespace is dropped; the leading space is kept, since it is part of the
    first token after ``"Critique:"``.
    """
    marker = verdict_prefix.strip()
    cut = text.find(marker) if marker else -1
    if cut < 0:
        cut = text.find("\n")
    return (text if cut < 0 else text[:cut]).rstrip()
