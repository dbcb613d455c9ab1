"""Critique-based scoring on top of any judge backend.

For each (prompt, response) the judge writes a critique against the principles, then a
verdict; the score is the expected verdict value under the judge's log-probs
(:func:`alignkit.judges.verdict.verdict_value`), or the parsed verdict when there are none.

* ``per_principle``: one critique and verdict per principle ``k``, combined as
  ``r = sum_k w_k s_k / sum_k w_k``; otherwise one critique against all principles at once.
* pairwise (:meth:`CritiqueJudge.compare`): ``P(a > b)``, judged in both orders and averaged,
  ``(P_AB(a) + 1 - P_AB(b)) / 2``, which cancels the judge's preference for a position.
* :meth:`CritiqueJudge.revise`: critique, then rewrite (Constitutional AI's SL stage).

A failed or unreadable verdict raises :class:`JudgeError` (``on_error="raise"``) or takes the
configured ``fallback_value`` with ``source="fallback"`` (``on_error="fallback"``); it is never
a silent zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from alignkit.errors import ConfigError
from alignkit.judges.base import JudgeBackend, JudgeError, Judgement, RawVerdict
from alignkit.judges.templates import JudgeTemplate, Principle
from alignkit.judges.verdict import parse_score, verdict_value

__all__ = ["CritiqueJudge", "PairJudgement"]

ON_ERROR = ("raise", "fallback")


@dataclass
class PairJudgement:
    """``prob_a``: the judge's probability that response a is better than b."""

    prob_a: float
    critique: str
    source: str
    error: str | None = None


class CritiqueJudge:
    """Principles, templates and verdict reading around a :class:`JudgeBackend`.

    Args:
        backend: the judge model.
        template: prompts and verdict options (:func:`alignkit.judges.load_template`).
        principles: the principles to judge against (default: the template's).
        per_principle: judge each principle apart and combine with the weights.
        on_error: ``raise`` or ``fallback``.
        fallback_value: the score of a failed judgement under ``on_error="fallback"``.
        score_scale: denominator of a bare parsed number (``"Score: 7"`` with 10 -> 0.7).
    """

    def __init__(
        self,
        backend: JudgeBackend,
        template: JudgeTemplate,
        *,
        principles: Sequence[Principle] | None = None,
        per_principle: bool = True,
        on_error: str = "raise",
        fallback_value: float | None = None,
        score_scale: float | None = None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ConfigError(f"judge on_error={on_error!r}; expected one of {', '.join(ON_ERROR)}")
        if on_error == "fallback" and fallback_value is None:
            raise ConfigError(
                "judge on_error=fallback needs fallback_value: the score a failed judgement "
                "gets (there is no silent default)"
            )
        self.backend = backend
        self.template = template
        self.principles = tuple(principles or template.principles)
        self.per_principle = per_principle
        self.on_error = on_error
        self.fallback_value = fallback_value
        self.score_scale = score_scale
        self.failures = 0
        """Judgements that fell back since construction."""

    # -- reading one verdict

    def _read(self, raw: RawVerdict | JudgeError, values: dict[str, float]) -> Judgement:
        if isinstance(raw, JudgeError):
            return self._fail(str(raw))
        if raw.option_logprobs is not None:
            try:
                return Judgement(
                    verdict_value(raw.option_logprobs, values), raw.critique, "logprobs"
                )
            except ValueError as exc:
                if parse_score(_after_marker(raw.text, self.template.verdict), values) is None:
                    return self._fail(f"{exc}; judge output: {raw.text[:200]!r}")
        parsed = parse_score(
            _after_marker(raw.text, self.template.verdict), values, self.score_scale
        )
        if parsed is None:
            return self._fail(f"no verdict in the judge's output: {raw.text[:200]!r}")
        return Judgement(parsed, raw.critique, "parsed")

    def _fail(self, message: str) -> Judgement:
        if self.on_error == "raise":
            raise JudgeError(f"judge {self.backend.name}: {message}")
        self.failures += 1
        return Judgement(float(self.fallback_value), "", "fallback", error=message)  # type: ignore[arg-type]

    def _judge(self, contexts: list[str], values: dict[str, float]) -> list[Judgement]:
        raws = self.backend.critique(contexts, self.template.verdict, list(values))
        if len(raws) != len(contexts):
            raise JudgeError(
                f"judge {self.backend.name} returned {len(raws)} verdicts "
                f"for {len(contexts)} inputs"
            )
        return [self._read(raw, values) for raw in raws]

    # -- public API

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        """One judgement per (prompt, response); per principle when configured."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        values = self.template.verdicts
        if not self.per_principle:
            contexts = [
                self.template.render_single(p, r, self.principles)
                for p, r in zip(prompts, responses, strict=True)
            ]
            return self._judge(contexts, values)
        k = len(self.principles)
        contexts = [
            self.template.render_single(p, r, (principle,))
            for p, r in zip(prompts, responses, strict=True)
            for principle in self.principles
        ]
        flat = self._judge(contexts, values)
        return [self._combine(flat[i * k : (i + 1) * k]) for i in range(len(prompts))]

    def _combine(self, parts: list[Judgement]) -> Judgement:
        """``sum_k w_k s_k / sum_k w_k`` over the principles; fallback if any part fell back."""
        total_w = sum(p.weight for p in self.principles)
        score = sum(p.weight * j.score for p, j in zip(self.principles, parts, strict=True))
        errors = [j.error for j in parts if j.error]
        sources = {j.source for j in parts}
        source = (
            "fallback" if "fallback" in sources else "parsed" if "parsed" in sources else "logprobs"
        )
        return Judgement(
            score=score / total_w,
            critique=" |".join(j.critique for j in parts),
            source=source,
            principles={p.name: j.score for p, j in zip(self.principles, parts, strict=True)},
            critiques={p.name: j.critique for p, j in zip(self.principles, parts, strict=True)},
            error="; ".join(errors) or None,
        )

    def compare(
        self,
        prompts: Sequence[str],
        a: Sequence[str],
        b: Sequence[str],
        *,
        both_orders: bool = True,
    ) -> list[PairJudgement]:
        """``P(a_i > b_i)`` per row, from the pairwise template's verdict (``A`` favourable).

        With ``both_orders`` the pair is also judged as (b, a) and the two estimates averaged:
        ``(P_AB + 1 - P_BA) / 2``.
        """
        if not len(prompts) == len(a) == len(b):
            raise ValueError("compare needs equally many prompts, a and b responses")
        values = self.template.pairwise_verdicts
        principles = self.principles
        contexts = [
            self.template.render_pairwise(p, x, y, principles)
            for p, x, y in zip(prompts, a, b, strict=True)
        ]
        if both_orders:
            contexts += [
                self.template.render_pairwise(p, y, x, principles)
                for p, x, y in zip(prompts, a, b, strict=True)
            ]
        flat = self._judge(contexts, values)
        n = len(prompts)
        out = []
        for i in range(n):
            first = flat[i]
            prob, source, error = first.score, first.source, first.error
            if both_orders:
                second = flat[n + i]
                prob = (first.score + 1.0 - second.score) / 2
                if "fallback" in (first.source, second.source):
                    source, error = "fallback", first.error or second.error
            out.append(PairJudgement(prob, first.critique, source, error))
        return out

    def critique_texts(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Judgement]:
        """Critiques against all principles at once (what a revision conditions on)."""
        contexts = [
            self.template.render_single(p, r, self.principles)
            for p, r in zip(prompts, responses, strict=True)
        ]
        return self._judge(contexts, self.template.verdicts)

    def revise(
        self, prompts: Sequence[str], responses: Sequence[str], *, max_tokens: int = 32
    ) -> list[tuple[Judgement, str | None]]:
        """(critique judgement, revised response or None when the revision failed) per row."""
        judged = self.critique_texts(prompts, responses)
        contexts = [
            self.template.render_revision(p, r, j.critique, self.principles)
            for p, r, j in zip(prompts, responses, judged, strict=True)
        ]
        revised = self.backend.complete(contexts, max_tokens)
        out: list[tuple[Judgement, str | None]] = []
        for j, text in zip(judged, revised, strict=True):
            if isinstance(text, JudgeError):
                if self.on_error == "raise":
                    raise text
                self.failures += 1
                out.append((j, None))
            else:
                out.append((j, text.split("\n", 1)[0].strip()))
        return out

    def close(self) -> None:
        self.backend.close()


def _after_marker(text: str, verdict_prefix: str) -> str:
    """The text after the verdict marker (all of it when the marker is absent)."""
    marker = verdict_prefix.strip()
    cut = text.find(marker) if marker else -1
    return text if cut < 0 else text[cut + len(marker) :]
