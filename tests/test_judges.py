"""Judges: verdict probabilities against hand-computed values, parsing, rank correlation,
templates, the critique judge's combination rules and error policy, and the local backend's
option log-probs against a direct computation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.judges import CritiqueJudge, JudgeError, RawVerdict, load_template
from alignkit.judges.base import cut_critique
from alignkit.judges.http import _verdict_logprobs, read_api_key
from alignkit.judges.templates import Principle
from alignkit.judges.verdict import (
    average_ranks,
    match_option_logprobs,
    parse_score,
    spearman,
    verdict_distribution,
    verdict_value,
)

GOOD_BAD = {" good": 1.0, " bad": 0.0}

# -------------------------------------------------------------------------------------------
# verdict probabilities
# -------------------------------------------------------------------------------------------


def test_verdict_probability_is_renormalised_over_the_options() -> None:
    # P(good) = 0.3, P(bad) = 0.1, the rest of the mass on other tokens: 0.3 / 0.4 = 0.75.
    lps = {" good": math.log(0.3), " bad": math.log(0.1)}
    assert verdict_value(lps, GOOD_BAD) == pytest.approx(0.75)
    # Only differences of log-probs matter: sigmoid(-1 - (-2)) = 0.7310585786.
    assert verdict_value({" good": -1.0, " bad": -2.0}, GOOD_BAD) == pytest.approx(0.7310585786)
    assert verdict_distribution({" good": -1.0, " bad": -2.0})[" bad"] == pytest.approx(
        0.2689414214
    )


def test_verdict_value_is_the_expected_value_of_graded_options() -> None:
    lps = {"1": math.log(0.2), "2": math.log(0.3), "3": math.log(0.5)}
    # 0.2 * 0 + 0.3 * 0.5 + 0.5 * 1 = 0.65
    assert verdict_value(lps, {"1": 0.0, "2": 0.5, "3": 1.0}) == pytest.approx(0.65)


def test_verdict_with_a_missing_option_and_with_none() -> None:
    assert verdict_value({" good": -0.5, " bad": -math.inf}, GOOD_BAD) == 1.0
    with pytest.raises(ValueError, match="no probability"):
        verdict_value({" good": -math.inf, " bad": -math.inf}, GOOD_BAD)
    with pytest.raises(ValueError, match="NaN"):
        verdict_value({" good": math.nan, " bad": 0.0}, GOOD_BAD)
    with pytest.raises(ValueError, match="differ"):
        verdict_value({" good": 0.0, " bad": 0.0}, {" good": 1.0, " meh": 0.0})


def test_top_logprobs_are_matched_up_to_spacing_and_case() -> None:
    top = {" good": -0.2, "Good": -1.5, "Ġbad": -2.0, " the": -3.0}
    got = match_option_logprobs(top, [" good", " bad"])
    assert got is not None
    assert got[" good"] == pytest.approx(math.log(math.exp(-0.2) + math.exp(-1.5)))
    assert got[" bad"] == pytest.approx(-2.0)
    only_good = match_option_logprobs({"good": -0.1}, [" good", " bad"])
    assert only_good == {" good": -0.1, " bad": -math.inf}
    assert match_option_logprobs({" the": -0.1}, [" good", " bad"]) is None


@pytest.mark.parametrize(
    ("text", "scale", "expected"),
    [
        (" good", None, 1.0),
        ("Verdict: bad, clearly", None, 0.0),
        (" 7/10", None, 0.7),
        ("Score: 4", 5.0, 0.8),
        (" 0.25", None, 0.25),
        (" 12/10", None, 1.0),
        (" nothing to see", None, None),
        (" 4", None, None),  # a bare number without a scale cannot be read
    ],
)
def test_parsed_verdicts(text: str, scale: float | None, expected: float | None) -> None:
    assert parse_score(text, GOOD_BAD, scale) == expected


def test_verdict_position_in_streamed_tokens() -> None:
    tokens = [" Wrong", ".", "\n", "Ver", "dict", ":", " bad"]
    tops = [{}, {}, {}, {}, {}, {}, {" bad": -0.1, " good": -2.3}]
    got = _verdict_logprobs(tokens, tops, "\nVerdict:", [" good", " bad"])
    assert got == {" good": -2.3, " bad": -0.1}
    assert _verdict_logprobs(tokens[:3], tops[:3], "\nVerdict:", [" good", " bad"]) is None


def test_cut_critique() -> None:
    assert cut_critique(" Wrong sum.\nVerdict: bad", "\nVerdict:") == " Wrong sum."
    assert cut_critique(" Fine.\nmore text", "\nVerdict:") == " Fine."
    assert cut_critique(" no marker at all ", "\nVerdict:") == " no marker at all"


# -------------------------------------------------------------------------------------------
# rank correlation
# -------------------------------------------------------------------------------------------


def test_spearman_matches_hand_computed_values() -> None:
    # No ties: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60 = 0.8.
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # Ties: ranks [1.5, 1.5, 3, 4] and [1, 2, 3.5, 3.5]; Pearson = 4 / 4.5.
    assert average_ranks([1, 1, 2, 3]) == [1.5, 1.5, 3.0, 4.0]
    assert spearman([1, 1, 2, 3], [1, 2, 3, 3]) == pytest.approx(4 / 4.5)
    assert spearman([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


# -------------------------------------------------------------------------------------------
# templates
# -------------------------------------------------------------------------------------------


def test_bundled_templates_load_and_render() -> None:
    t = load_template("assist")
    assert [p.name for p in t.principles] == ["helpful", "concise", "harmless"]
    text = t.render_single("User: What is 2 plus 3?\nAssistant:", " 5 ", t.principles[:1])
    assert text == "Judge: The answer is right.\nUser: What is 2 plus 3?\nAssistant: 5\nCritique:"
    general = load_template("general")
    assert set(general.verdicts) == {" Yes", " No"}


def test_template_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text(
        "principles: [{name: a, text: A}]\nsingle: '{prompt} {answer}'\npairwise: x\n"
        "revision: x\nverdict: V\nverdicts: {a: 1, b: 0}\npairwise_verdicts: {a: 1, b: 0}\n"
    )
    with pytest.raises(ConfigError, match=r"single uses unknown placeholders \['answer'\]"):
        load_template(str(bad))
    with pytest.raises(ConfigError, match=r"bundled templates: .*assist"):
        load_template("no_such_template")


# -------------------------------------------------------------------------------------------
# the critique judge over a scripted backend
# -------------------------------------------------------------------------------------------


class ScriptedBackend:
    """Answers each context with the log-probs (or text / error) a function gives it."""

    name = "scripted"

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.contexts: list[str] = []

    def critique(
        self, contexts: Sequence[str], verdict_prefix: str, options: Sequence[str]
    ) -> list[RawVerdict | JudgeError]:
        self.contexts += contexts
        return [self.answer(c) for c in contexts]  # type: ignore[operator]

    def complete(self, contexts: Sequence[str], max_tokens: int) -> list[str | JudgeError]:
        return ["5\nextra"] * len(contexts)

    def close(self) -> None:
        pass


def _p(good: float) -> dict[str, float]:
    return {" good": math.log(good), " bad": math.log(1 - good)}


def test_per_principle_scores_combine_with_weights() -> None:
    t = load_template("assist")
    probs = {"right": 0.9, "short": 0.2, "safe": 0.5}

    def answer(context: str) -> RawVerdict:
        key = next(k for k in probs if f"The answer is {k}." in context)
        return RawVerdict(f" {key}", _p(probs[key]), "")

    judge = CritiqueJudge(ScriptedBackend(answer), t)
    (j,) = judge.score(["User: q\nAssistant:"], ["a"])
    # 0.6 * 0.9 + 0.2 * 0.2 + 0.2 * 0.5 = 0.68
    assert j.score == pytest.approx(0.68)
    assert j.principles == pytest.approx({"helpful": 0.9, "concise": 0.2, "harmless": 0.5})
    assert j.critiques["concise"] == " short" and j.source == "logprobs"
    custom = CritiqueJudge(
        ScriptedBackend(answer), t, principles=[Principle("h", "The answer is right.", 1)]
    )
    assert custom.score(["p"], ["a"])[0].score == pytest.approx(0.9)


def test_combined_mode_is_one_judgement_against_all_principles() -> None:
    backend = ScriptedBackend(lambda c: RawVerdict(" ok", _p(0.3), ""))
    judge = CritiqueJudge(backend, load_template("assist"), per_principle=False)
    (j,) = judge.score(["p"], ["a"])
    assert j.score == pytest.approx(0.3)
    assert len(backend.contexts) == 1
    assert "right. The answer is short. The answer is safe." in backend.contexts[0]


def test_pairwise_is_judged_in_both_orders() -> None:
    # The judge prefers position A by 0.2 whatever it sees, and prefers "x" over "y".
    def answer(context: str) -> RawVerdict:
        a_is_x = "A: x" in context
        p = 0.8 if a_is_x else 0.4  # P(A better)
        return RawVerdict("", {" A": math.log(p), " B": math.log(1 - p)}, "")

    judge = CritiqueJudge(ScriptedBackend(answer), load_template("assist"))
    (res,) = judge.compare(["p"], ["x"], ["y"])
    # (P_AB(x) + 1 - P_AB(y)) / 2 = (0.8 + 1 - 0.4) / 2 = 0.7
    assert res.prob_a == pytest.approx(0.7)
    (one,) = judge.compare(["p"], ["x"], ["y"], both_orders=False)
    assert one.prob_a == pytest.approx(0.8)


def test_parsed_fallback_and_error_policy() -> None:
    t = load_template("assist")
    parsed = CritiqueJudge(
        ScriptedBackend(lambda c: RawVerdict(" ok", None, " ok\nVerdict: good")), t
    )
    assert [(j.score, j.source) for j in parsed.score(["p"], ["a"])] == [(1.0, "parsed")]

    garbage = ScriptedBackend(lambda c: RawVerdict("", None, "#!?"))
    with pytest.raises(JudgeError, match="no verdict"):
        CritiqueJudge(garbage, t).score(["p"], ["a"])
    failing = ScriptedBackend(lambda c: JudgeError("server down"))
    with pytest.raises(JudgeError, match="server down"):
        CritiqueJudge(failing, t).score(["p"], ["a"])
    with pytest.raises(ConfigError, match="fallback_value"):
        CritiqueJudge(failing, t, on_error="fallback")
    fb = CritiqueJudge(failing, t, on_error="fallback", fallback_value=0.5, per_principle=False)
    (j,) = fb.score(["p"], ["a"])
    assert (j.score, j.source, j.error) == (0.5, "fallback", "server down")
    assert fb.failures == 1


def test_revise_keeps_the_first_line() -> None:
    judge = CritiqueJudge(
        ScriptedBackend(lambda c: RawVerdict(" wrong", _p(0.1), "")), load_template("assist")
    )
    ((judged, text),) = judge.revise(["User: What is 2 plus 3?\nAssistant:"], ["6"])
    assert judged.critique == " wrong" and text == "5"


def test_api_key_env_holds_a_name_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as err:
        read_api_key("sk-live-0123456789")
    assert "sk-live" not in str(err.value)
    with pytest.raises(ConfigError, match="JUDGE_KEY_FOR_TEST is not set"):
        read_api_key("JUDGE_KEY_FOR_TEST")
    monkeypatch.setenv("JUDGE_KEY_FOR_TEST", "secret-value")
    assert read_api_key("JUDGE_KEY_FOR_TEST") == "secret-value"
    assert read_api_key(None) is None


# -------------------------------------------------------------------------------------------
# the local backend
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignkit.models import TinyModelSpec, build_tiny_model

    out = tmp_path_factory.mktemp("lm") / "lm"
    corpus = ["Judge: it is good.\nVerdict: good bad A B yes no fine"] * 20
    spec = TinyModelSpec(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=64)
    return build_tiny_model(out, corpus, spec)


def test_local_option_logprobs_match_a_direct_forward(random_lm: Path) -> None:
    from alignkit.judges.local import LocalJudge

    judge = LocalJudge(str(random_lm), max_critique_tokens=4)
    tok, model = judge.tokenizer, judge.model
    prefixes = ["Judge: it is good.\nVerdict:", "fine\nVerdict:"]
    single = judge.option_logprobs(prefixes, [" good", " bad"])
    multi = judge.option_logprobs(prefixes, [" good", " bad fine"])
    for row, prefix in enumerate(prefixes):
        for col, option in enumerate([" good", " bad fine"]):
            p_ids = tok(prefix)["input_ids"]
            o_ids = tok(option)["input_ids"]
            ids = torch.tensor([p_ids + o_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            want = sum(logp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(o_ids))
            assert multi[row, col].item() == pytest.approx(want, abs=1e-4)
            if col == 0:
                assert single[row, 0].item() == pytest.approx(want, abs=1e-4)
    raws = judge.critique(prefixes, "\nVerdict:", [" good", " bad"])
    assert all(
        isinstance(r, RawVerdict) and set(r.option_logprobs or {}) == {" good", " bad"}
        for r in raws
    )
