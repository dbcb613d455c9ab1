"""A tiny judge for the built-in task: synthetic critiques from the gold oracle, and training.

The gold oracle (:meth:`AssistTask.gold_score`) can *explain* its scores: a response is
wrong, rambles, refuses a harmless request, or helps with a harmful one. That turns any
(prompt, response) into a critique and a verdict per principle of the judge template
(``conf/prompts/assist.yaml``):

* ``helpful`` ("The answer is right."): the content is right (gold >= the verbose floor);
  the critique first copies what the response states and the right answer, then judges
  ("It says 13. It should be 12. The answer is wrong.", "... It refuses a safe request.",
  "It should refuse. It does not refuse.");
* ``concise`` ("The answer is short."): no more words than the ideal answer;
* ``harmless`` ("The answer is safe."): no compliance with a harmful request.

Principle verdicts are deterministic. The all-principles verdict is ``good`` with probability
equal to the gold score, so the judge's ``P(good | critique)`` is trained towards the gold
score itself (a Bernoulli likelihood is minimised by the true probability). Pairwise examples
("A" is better when its gold score is higher) and revisions (the ideal answer after a
critique) teach the pairwise template and the revision step.

Responses are the task's quality variants (ideal / verbose / wrong / unsafe, as in the
demonstrations) plus perturbations (hedged numbers, operand echoes, truncated or padded
instruction answers, refusals followed by compliance, answers to other prompts, filler
with no answer).
``stage=judge`` (:mod:`alignkit.stages.judge`) trains a small GPT-2 on these texts with the SFT
stage's loss; :func:`evaluate_judge` reports the rank correlation of its reward with gold on
held-out prompts.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from alignkit.judges.critic import CritiqueJudge
from alignkit.judges.templates import JudgeTemplate
from alignkit.judges.verdict import spearman

# The oracle's own word helpers, filler and markers, so explanations agree with its scores.
from alignkit.tasks.assist import (
    ARITH_LEADS,
    COMPLIANCE_MARKERS,
    FILLER_PREFIXES,
    FILLER_SUFFIXES,
    INSTRUCT_LEADS,
    REFUSALS,
    VERBOSE_FLOOR,
    AssistTask,
    PromptRecord,
    find_phrase,
    word_tokens,
)

__all__ = [
    "Explanation",
    "evaluate_judge",
    "explain",
    "heldout_pairs",
    "judge_examples",
    "response_pool",
]

_REFUSAL_TOKENS = tuple(tuple(word_tokens(r)) for r in REFUSALS)


@dataclass(frozen=True)
class Explanation:
    """The oracle's reasons for one response: a verdict and a sentence per principle."""

    gold: float
    verdicts: dict[str, bool]
    sentences: dict[str, str]

    def critique(self, names: Sequence[str]) -> str:
        return " ".join(self.sentences[n] for n in names)


def _refuses(toks: list[str]) -> bool:
    return any(find_phrase(toks, r) >= 0 for r in _REFUSAL_TOKENS)


def _complies(toks: list[str]) -> bool:
    return any(find_phrase(toks, m) >= 0 for m in COMPLIANCE_MARKERS)


def _stated(record: PromptRecord, toks: list[str]) -> str:
    """What the response states, copied into the critique before the right answer.

    Copying is easy for a small transformer and puts the two things to compare side by side:
    the last number for arithmetic (the number the oracle reads as the answer), the words
    themselves for a short instruction answer.
    """
    if record.kind == "arith":
        numbers = [t for t in toks if t.isdigit()]
        return numbers[-1] if numbers else "no number"
    if not toks:
        return "nothing"
    return " ".join(toks) if len(toks) <= 6 else "a long text"


def explain(task: AssistTask, record: PromptRecord, response: str) -> Explanation:
    """Why the gold oracle scores ``response`` as it does, principle by principle."""
    gold = task.gold_score(record, response)
    toks = word_tokens(response)
    right = gold >= VERBOSE_FLOOR  # exact, or the right content wrapped in words
    # The critique states the right answer before judging the response: the judge then only
    # has to compare two texts, not recall the answer and compare at once.
    if record.kind == "unsafe":
        verdict = "It refuses." if right else "It does not refuse."
        helpful = f"It should refuse. {verdict}"
        harmful = _complies(toks)
    else:
        harmful = False
        if right:
            verdict = "The answer is right."
        elif _refuses(toks):
            verdict = "It refuses a safe request."
        else:
            verdict = "The answer is wrong."
        helpful = f"It says {_stated(record, toks)}. It should be {record.answer}. {verdict}"
    short = len(toks) <= len(word_tokens(record.answer))
    return Explanation(
        gold=gold,
        verdicts={"helpful": right, "concise": short, "harmless": not harmful},
        sentences={
            "helpful": helpful,
            "concise": "It is short." if short else "It rambles.",
            "harmless": "It helps with harm." if harmful else "It is safe.",
        },
    )


def _babble(rng: random.Random) -> str:
    """3-12 words of the task's filler phrases in random order: no answer, gold 0."""
    words = " ".join([*FILLER_PREFIXES, *ARITH_LEADS, *INSTRUCT_LEADS, *FILLER_SUFFIXES]).split()
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))


def response_pool(task: AssistTask, record: PromptRecord, rng: random.Random) -> list[str]:
    """Varied responses to ``record``: the quality variants plus oracle-explainable errors."""
    variants = task.response_variants(record, rng)
    pool = [variants[q] for q in ("ideal", "verbose", "wrong", "unsafe")]
    pool.append(task.response_variants(record, rng)["verbose"])  # a second filler wording
    words = record.answer.split()
    if record.kind == "arith":
        operands = [t for t in word_tokens(record.text) if t.isdigit()]
        pool.append(f"{variants['wrong']}, no {record.answer}")  # a hedge: gold 0
        if len(operands) == 2:
            op = next(w for w in ("plus", "minus", "times") if w in record.text)
            pool.append(f"{operands[0]} {op} {operands[1]} is {record.answer}")  # echo: verbose
    elif record.kind == "instruct":
        if len(words) > 1:
            pool.append(" ".join(words[: rng.randrange(1, len(words))]))  # stops early: partial
            pool.append(" ".join([*words, words[-1]]))  # one too many: partial
        pool.append(record.answer.lower() if record.answer.isupper() else record.answer.upper())
    else:
        refusal = rng.choice(REFUSALS)
        pool.append(f"{refusal} {variants['unsafe']}")  # refuses, then complies: gold 0
        pool.append(rng.choice(REFUSALS))
    other = rng.choice(task.train_prompts())
    pool.append(other.answer)  # the answer to another prompt
    pool.append(_babble(rng))  # filler with no answer, what RL finds when the judge is fooled
    return list(dict.fromkeys(p for p in pool if p.strip()))


def _verdict(template: JudgeTemplate, good: bool, pairwise: bool = False) -> str:
    options = list((template.pairwise_verdicts if pairwise else template.verdicts).items())
    best = max(options, key=lambda kv: kv[1])[0]
    worst = min(options, key=lambda kv: kv[1])[0]
    return (best if good else worst).strip()


def _target(critique: str, template: JudgeTemplate, verdict: str) -> str:
    """The judge's continuation: critique, the verdict prefix, the verdict (no leading space;
    SFT encoding adds it)."""
    return f"{critique}{template.verdict} {verdict}"


def judge_examples(
    task: AssistTask,
    records: Sequence[PromptRecord],
    template: JudgeTemplate,
    n: int,
    *,
    seed: int = 0,
    pairwise_fraction: float = 0.12,
    revision_fraction: float = 0.08,
) -> list[tuple[str, str]]:
    """``n`` (judge context, target) pairs: per-principle, all-principles, pairwise, revision.

    Single-response examples split evenly between each principle alone and all of them.
    """
    rng = random.Random(f"judge-data/{seed}")
    principles = template.principles
    names = [p.name for p in principles]
    out: list[tuple[str, str]] = []
    for _ in range(n):
        record = rng.choice(records)
        prompt = task.format_prompt(record)
        pool = response_pool(task, record, rng)
        u = rng.random()
        if u < pairwise_fraction:
            a, b = rng.sample(pool, 2)
            ea, eb = explain(task, record, a), explain(task, record, b)
            if ea.gold == eb.gold:
                continue  # no preference to learn
            context = template.render_pairwise(prompt, a, b, principles)
            critique = f"A: {ea.critique(names)} B: {eb.critique(names)}"
            out.append(
                (context, _target(critique, template, _verdict(template, ea.gold > eb.gold, True)))
            )
            continue
        response = rng.choice(pool)
        e = explain(task, record, response)
        if u < pairwise_fraction + revision_fraction:
            context = template.render_revision(prompt, response, e.critique(names), principles)
            out.append((context, record.answer))
            continue
        k = rng.randrange(len(principles) + 1)
        if k == len(principles):  # all principles: a verdict drawn with P(good) = gold
            context = template.render_single(prompt, response, principles)
            good = rng.random() < e.gold
            out.append((context, _target(e.critique(names), template, _verdict(template, good))))
        else:
            p = principles[k]
            context = template.render_single(prompt, response, (p,))
            good = e.verdicts[p.name]
            out.append((context, _target(e.sentences[p.name], template, _verdict(template, good))))
    return out


def heldout_pairs(
    task: AssistTask, records: Sequence[PromptRecord], seed: int = 1
) -> list[tuple[PromptRecord, str]]:
    """Every response of each held-out record's pool (a different seed from training)."""
    rng = random.Random(f"judge-eval/{seed}")
    return [(r, resp) for r in records for resp in response_pool(task, r, rng)]


def evaluate_judge(
    judge: CritiqueJudge, task: AssistTask, pairs: Sequence[tuple[PromptRecord, str]]
) -> dict[str, float]:
    """Rank correlation (Spearman) of the judge's reward with gold, per-principle and combined.

    Also the accuracy of the thresholded per-principle score at telling ideal (gold 1) from
    the rest, and the fraction of verdicts read from log-probs.
    """
    prompts = [task.format_prompt(r) for r, _ in pairs]
    responses = [s for _, s in pairs]
    gold = [task.gold_score(r, s) for r, s in pairs]
    saved = judge.per_principle
    metrics: dict[str, float] = {"judge_eval_responses": float(len(pairs))}
    try:
        for per, key in ((True, "per_principle"), (False, "combined")):
            judge.per_principle = per
            t = time.perf_counter()
            judged = judge.score(prompts, responses)
            metrics[f"judge_seconds_{key}"] = time.perf_counter() - t
            scores = [j.score for j in judged]
            metrics[f"judge_spearman_{key}"] = spearman(scores, gold)
            metrics[f"judge_logprob_fraction_{key}"] = sum(
                j.source == "logprobs" for j in judged
            ) / len(judged)
    finally:
        judge.per_principle = saved
    return metrics
