"""From a judge's output to a reward: verdict probabilities, parsed scores, rank correlation.

A judge ends its critique with a verdict, one of a few options (``" good"`` / ``" bad"``,
``"Yes"`` / ``"No"``, ``" A"`` / ``" B"``), each mapped to a value (1 for the favourable
option, 0 otherwise; Likert options to their score). Where the judge exposes log-probs the
reward is the expected value of the verdict under the judge's distribution *restricted to the
options* (renormalised, since the judge also puts mass on tokens that are no verdict)::

    p_o = exp(l_o) / sum_{o'} exp(l_{o'})        r = sum_o p_o * v_o

with ``l_o`` the log-probability of option ``o`` after the verdict prefix. With the values
``{good: 1, bad: 0}`` this is ``P(good | prompt, response, critique)`` (Bai et al. 2022,
Constitutional AI, use the normalised probability of the option tokens in the same way).
Where no log-probs are available, the verdict is parsed from the text: an option word, or a
numeric score (``"7/10"``, ``"Score: 4"``) scaled to [0, 1].
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

__all__ = [
    "average_ranks",
    "match_option_logprobs",
    "option_key",
    "parse_score",
    "spearman",
    "verdict_distribution",
    "verdict_value",
]

_NUMBER = re.compile(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?")


def option_key(text: str) -> str:
    """The comparison form of a verdict option or token: stripped and lower-cased.

    Tokenisers disagree on where the space goes (``" good"``, ``"Ġgood"``, ``"good"``), so
    options and tokens are matched on this form.
    """
    return text.replace("\u0120", " ").replace("\u2581", " ").strip().lower()


def _logsumexp(values: Sequence[float]) -> float:
    finite = [v for v in values if v != -math.inf]
    if not finite:
        return -math.inf
    top = max(finite)
    return top + math.log(sum(math.exp(v - top) for v in finite))


def verdict_distribution(option_logprobs: Mapping[str, float]) -> dict[str, float]:
    """Softmax over the options' log-probs: ``p_o = exp(l_o) / sum exp(l_o')``.

    ``-inf`` (an option the judge gave no mass, or that was not among the returned top
    tokens) gets probability 0. Raises ValueError when every option is ``-inf`` or NaN: there
    is no verdict to read, and a silent 0 would be a wrong reward.
    """
    if not option_logprobs:
        raise ValueError("no verdict options given")
    if any(math.isnan(v) for v in option_logprobs.values()):
        raise ValueError(f"verdict log-probs contain NaN: {dict(option_logprobs)}")
    total = _logsumexp(list(option_logprobs.values()))
    if total == -math.inf:
        raise ValueError(
            f"the judge gave no probability to any verdict option {list(option_logprobs)}"
        )
    return {
        o: math.exp(lp - total) if lp != -math.inf else 0.0 for o, lp in option_logprobs.items()
    }


def verdict_value(option_logprobs: Mapping[str, float], values: Mapping[str, float]) -> float:
    """Expected verdict value ``sum_o p_o v_o`` with ``p`` from :func:`verdict_distribution`.

    Args:
        option_logprobs: option -> log-probability (any base-e scale; only differences matter).
        values: option -> value, the same keys.
    """
    missing = set(option_logprobs) ^ set(values)
    if missing:
        raise ValueError(f"verdict options and values differ: {sorted(missing)}")
    probs = verdict_distribution(option_logprobs)
    return sum(probs[o] * float(values[o]) for o in probs)


def match_option_logprobs(
    top_logprobs: Mapping[str, float], options: Sequence[str]
) -> dict[str, float] | None:
    """Log-probs of each option's first token from a server's ``top_logprobs`` at one position.

    Tokens that equal an option up to spacing and case (``" Good"``, ``"good"``) all count for
    it: their probabilities are summed (log-sum-exp). An option absent from the top tokens
    gets ``-inf``. Returns None when no option is among them (the caller falls back to
    parsing the text).
    """
    keys = {option_key(o): o for o in options}
    if len(keys) != len(options):
        raise ValueError(f"verdict options collide after stripping spaces and case: {options}")
    found: dict[str, list[float]] = {o: [] for o in options}
    for token, lp in top_logprobs.items():
        option = keys.get(option_key(token))
        if option is not None and lp is not None:
            found[option].append(float(lp))
    if not any(found.values()):
        return None
    return {o: _logsumexp(v) if v else -math.inf for o, v in found.items()}


def parse_score(text: str, values: Mapping[str, float], scale: float | None = None) -> float | None:
    """A verdict read from text: the first option word, else a number scaled to [0, 1].

    ``"good"`` -> ``values["good"]``; ``"7/10"`` -> 0.7; ``"Score: 4"`` with ``scale=5`` ->
    0.8 (a bare number needs ``scale``; a number already in [0, 1] is taken as is). Returns
    None when nothing can be read.
    """
    words = re.findall(r"[A-Za-z]+|\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?", text)
    keyed = {option_key(o): v for o, v in values.items()}
    for word in words:
        if option_key(word) in keyed:
            return float(keyed[option_key(word)])
        match = _NUMBER.fullmatch(word.replace(" ", ""))
        if match:
            number = float(match.group(1))
            denominator = float(match.group(2)) if match.group(2) else scale
            if denominator:
                return min(1.0, max(0.0, number / denominator))
            if 0.0 <= number <= 1.0:
                return number
    return None


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing the mean of their positions: [3, 1, 3] -> [2.5, 1, 2.5]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson correlation of the average ranks (ties allowed).

    Returns NaN when either side is constant (the correlation is undefined).
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    rx, ry = average_ranks(x), average_ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)
