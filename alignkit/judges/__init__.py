"""Judges: language models that critique responses against principles and give a verdict.

* :mod:`~alignkit.judges.verdict`: verdict probabilities from log-probs, parsed scores, rank
  correlation;
* :mod:`~alignkit.judges.templates`: the prompt templates (``conf/prompts/*.yaml``);
* :mod:`~alignkit.judges.base`: the backend protocol and the judgement record;
* :mod:`~alignkit.judges.critic`: per-principle, combined, pairwise scoring and revision;
* :mod:`~alignkit.judges.local` and :mod:`~alignkit.judges.http`: the two backends;
* :mod:`~alignkit.tools.judge_server`: a minimal OpenAI-compatible server for a local model.
"""

from __future__ import annotations

from alignkit.judges.base import JudgeBackend, JudgeError, Judgement, RawVerdict
from alignkit.judges.critic import CritiqueJudge, PairJudgement
from alignkit.judges.templates import JudgeTemplate, Principle, load_template
from alignkit.judges.verdict import spearman, verdict_distribution, verdict_value

__all__ = [
    "CritiqueJudge",
    "JudgeBackend",
    "JudgeError",
    "JudgeTemplate",
    "Judgement",
    "PairJudgement",
    "Principle",
    "RawVerdict",
    "load_template",
    "spearman",
    "verdict_distribution",
    "verdict_value",
]
