"""Evaluation without a gold oracle: reward-model and pairwise-judge win-rates.

The policies are the shared smoke SFT policy and the untrained base model it started from.
The judge is a stub OpenAI-compatible server on localhost that reads both responses back out
of the rendered pairwise prompt and answers by a known rule, so every expected number is
computed here, independently, from the logged samples.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.config import EvalConfig
from alignkit.context import RunContext
from alignkit.errors import ConfigError
from alignkit.evaluation import judge_win_rates, mean_length, sample_table, win_rate
from alignkit.judges import JudgeError
from alignkit.models import ScalarHeadModel, load_causal_lm
from alignkit.rewards.learned import EnsembleScorer, RewardScorer
from alignkit.stages.evaluate import Evaluators, build_evaluators, compare_policies
from alignkit.tasks import AssistTask
from alignkit.tracking import Tracker
from tests.conftest import SMOKE, run_cli
from tests.test_judges_http import Stub

TASK = AssistTask(seed=0, max_operand=5)  # what the CLI builds from the default task config
PROMPTS = {TASK.format_prompt(r): r for r in TASK.eval_prompts()}
NUM_PROMPTS, SAMPLES = 12, 2
PAIRS = NUM_PROMPTS * SAMPLES
# The general template's pairwise text, with both responses between fixed markers.
PAIRWISE = re.compile(
    r"Request:\n(?P<prompt>.*?)\n\nResponse A: (?P<a>.*?)\nResponse B: (?P<b>.*?)\n\n"
    r"Write a one-sentence critique",
    re.DOTALL,
)


# -------------------------------------------------------------------------------------------
# a stub judge
# -------------------------------------------------------------------------------------------


def gold_rule(prompt: str, a: str, b: str) -> str:
    """The stub's verdict: the response with the higher gold score; a tie goes to B."""
    record = PROMPTS[prompt]
    return "A" if TASK.gold_score(record, a) > TASK.gold_score(record, b) else "B"


def stub_judge(rule: Callable[[str, str, str], str | None]) -> Stub:
    """A ``/v1/completions`` stub answering ``" ...\nVerdict: <rule(prompt, a, b)>"`` (no
    log-probs), HTTP 500 when the rule gives None; ``stub.count`` counts the requests."""

    def reply(n: int, body: dict) -> tuple[int, str]:
        match = PAIRWISE.search(body["prompt"])
        letter = rule(*match.group("prompt", "a", "b")) if match else None
        if not letter:
            return 500, json.dumps({"choices": [{"text": "unreadable"}]})
        text = f" Compared the two.\nVerdict: {letter}"
        return 200, json.dumps({"choices": [{"text": text, "finish_reason": "stop"}]})

    return Stub(reply)


@pytest.fixture
def stub_factory() -> Iterator[Callable[[Callable[[str, str, str], str | None]], Stub]]:
    stubs: list[Stub] = []

    def make(rule: Callable[[str, str, str], str | None]) -> Stub:
        stubs.append(stub_judge(rule))
        return stubs[-1]

    yield make
    for stub in stubs:
        stub.close()


# -------------------------------------------------------------------------------------------
# policies and an in-process context
# -------------------------------------------------------------------------------------------


@dataclass
class Policies:
    policy: Any
    baseline: Any
    tokenizer: Any
    folder: Path


@pytest.fixture(scope="module")
def policies(sft_run: Path) -> Policies:
    """The smoke SFT policy and the untrained base model (much worse by the gold oracle)."""
    policy, tok = load_causal_lm(str(sft_run / "sft"))
    baseline, _ = load_causal_lm(str(sft_run / "base_model"))
    return Policies(policy, baseline, tok, sft_run)


class NoGoldTask:
    """The built-in task's prompts without its gold oracle, as a user's own data would be."""

    def eval_prompts(self) -> list[Any]:
        return TASK.eval_prompts()

    def format_prompt(self, record: Any) -> str:
        return TASK.format_prompt(record)


def make_ctx(run_dir: Path, task: Any = TASK, reward: dict | None = None, **judge: Any) -> Any:
    ecfg = OmegaConf.merge(
        OmegaConf.structured(EvalConfig),
        {
            "num_prompts": NUM_PROMPTS,
            "samples_per_prompt": SAMPLES,
            "max_new_tokens": 12,
            "samples_to_show": PAIRS,  # every pair in the table, to recompute the numbers
            "judge": {"template": "general", "max_retries": 0, **judge},
        },
    )
    cfg = OmegaConf.create(
        {"seed": 0, "task": {"max_prompt_tokens": 32}, "reward": reward or {}, "eval": ecfg}
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        cfg=cfg, run_dir=run_dir, plugins=None, registry=None, tracker=Tracker(run_dir)
    )  # type: ignore[arg-type]
    ctx.task = task
    return ctx


def compare(ctx: Any, p: Policies, evaluators: Evaluators | None = None) -> dict[str, Any]:
    return compare_policies(ctx, p.policy, p.baseline, p.tokenizer, evaluators)


def table(run_dir: Path) -> list[dict[str, Any]]:
    """The eval sample table as one dict per row."""
    raw = json.loads((run_dir / "eval_samples.json").read_text())
    return [dict(zip(raw["columns"], row, strict=True)) for row in raw["rows"]]


def record_of(text: str) -> Any:
    return next(r for r in TASK.eval_prompts() if r.text == text)


# -------------------------------------------------------------------------------------------
# the pure pieces
# -------------------------------------------------------------------------------------------


def test_judge_win_rates_soft_and_hard_by_hand() -> None:
    soft, hard = judge_win_rates([1.0, 0.5, 0.25, 0.75])
    assert soft == pytest.approx(2.5 / 4)
    assert hard == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # 0.5 is a tie, 0.25 a loss
    with pytest.raises(ValueError):
        judge_win_rates([])


def test_mean_length_counts_real_tokens_only() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert mean_length(mask) == pytest.approx(3.0)


def test_sample_table_has_every_score_column() -> None:
    records = TASK.eval_prompts()[:2]
    header, rows = sample_table(
        records,
        {"baseline": ["x", "y"], "policy": ["5", "6"]},
        {"baseline": {"gold": [0.0, 0.1]}, "policy": {"gold": [1.0, 0.0], "rm": [0.25, -1]}},
        2,
        {"judge P(policy)": [0.75, 0.5]},
    )
    assert header == [
        "prompt", "baseline", "baseline gold", "policy", "policy gold", "policy rm",
        "judge P(policy)",
    ]  # fmt: skip
    assert rows[1] == [records[1].text, "y", 0.1, "6", 0.0, -1.0, 0.5]


# -------------------------------------------------------------------------------------------
# the judged win-rate
# -------------------------------------------------------------------------------------------


def expected_prob(row: dict[str, Any], both_orders: bool = True) -> float:
    """P(policy better) the gold-rule stub implies for one logged pair: (P_AB + 1 - P_BA) / 2."""
    prompt = TASK.format_prompt(record_of(row["prompt"]))
    pol, base = row["policy"].strip(), row["baseline"].strip()  # the template strips them
    p_ab = 1.0 if gold_rule(prompt, pol, base) == "A" else 0.0
    if not both_orders:
        return p_ab
    p_ba = 1.0 if gold_rule(prompt, base, pol) == "A" else 0.0
    return (p_ab + 1.0 - p_ba) / 2


def test_judge_win_rate_equals_the_stub_rule_on_the_same_samples(
    policies: Policies, stub_factory: Any, tmp_path: Path
) -> None:
    stub = stub_factory(gold_rule)
    summary = compare(make_ctx(tmp_path, backend="http", url=stub.url), policies)
    rows = table(tmp_path)
    assert len(rows) == PAIRS and stub.count == 2 * PAIRS
    want = [expected_prob(r) for r in rows]
    assert {0.0, 0.5, 1.0} & set(want) != {0.5}, "the rule must separate some pairs"
    assert [r["judge P(policy)"] for r in rows] == pytest.approx(want)
    assert summary["judge_win_rate"] == pytest.approx(sum(want) / PAIRS)
    hard = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in want) / PAIRS
    assert summary["judge_win_rate_hard"] == pytest.approx(hard)
    assert summary["judge_failures"] == 0.0
    # The task has a gold oracle, so the headline win-rate is the gold one (equal here).
    assert summary["win_rate"] == summary["gold_win_rate"] == summary["judge_win_rate"]
    assert summary["win_rate_source"] == "gold"
    # A judge that follows the gold oracle, both orders averaged, agrees with the gold win-rate
    # (a tie becomes one A and one B verdict: 0.5), and the SFT policy beats the base model.
    assert summary["judge_win_rate"] == pytest.approx(summary["gold_win_rate"])
    assert summary["judge_win_rate"] > 0.5
    gold_pol = [TASK.gold_score(record_of(r["prompt"]), r["policy"]) for r in rows]
    gold_base = [TASK.gold_score(record_of(r["prompt"]), r["baseline"]) for r in rows]
    assert summary["gold_win_rate"] == pytest.approx(win_rate(gold_pol, gold_base))
    assert not any(k.startswith("rm_") for k in summary)
    # The untrained model rambles to the token limit; the SFT policy stops early.
    assert summary["length_policy"] < summary["length_baseline"] <= 12
    assert summary["kl_to_baseline"] == summary["kl_to_sft"] > 0


@pytest.mark.parametrize(("both_orders", "want"), [(True, 0.5), (False, 1.0)])
def test_a_judge_that_always_says_a_is_cancelled_by_both_orders(
    policies: Policies, stub_factory: Any, tmp_path: Path, both_orders: bool, want: float
) -> None:
    stub = stub_factory(lambda prompt, a, b: "A")
    ctx = make_ctx(tmp_path, backend="http", url=stub.url, both_orders=both_orders)
    summary = compare(ctx, policies)
    assert summary["judge_win_rate"] == want and summary["judge_win_rate_hard"] == want
    assert stub.count == (2 if both_orders else 1) * PAIRS
    assert {r["judge P(policy)"] for r in table(tmp_path)} == {want}


def test_judge_without_gold_and_judge_failures(
    policies: Policies, stub_factory: Any, tmp_path: Path
) -> None:
    stub = stub_factory(gold_rule)
    summary = compare(
        make_ctx(tmp_path / "ok", NoGoldTask(), backend="http", url=stub.url), policies
    )
    assert summary["win_rate_source"] == "judge" and summary["win_rate"] > 0.5
    assert not any(k.startswith("gold_") for k in summary)
    assert "policy gold" not in table(tmp_path / "ok")[0]

    broken = stub_factory(lambda prompt, a, b: None)  # HTTP 500 to every request
    with pytest.raises(JudgeError, match=r"eval\.judge.*on_error=fallback"):
        compare(make_ctx(tmp_path / "raise", backend="http", url=broken.url), policies)
    ctx = make_ctx(
        tmp_path / "fallback", backend="http", url=broken.url, on_error="fallback",
        fallback_value=0.5,
    )  # fmt: skip
    summary = compare(ctx, policies)
    assert summary["judge_failures"] == 2 * PAIRS
    assert summary["judge_win_rate"] == 0.5


# -------------------------------------------------------------------------------------------
# the reward-model win-rate
# -------------------------------------------------------------------------------------------


class WordCountScorer:
    """A reward model whose score is known: the number of words of the response."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.conversations: list[Any] = []
        self.finished: list[Any] = []

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        conversations: Any = None,
        finished: Any = None,
    ) -> torch.Tensor:
        self.prompts += list(prompts)
        self.conversations += list(conversations) if conversations is not None else []
        self.finished.append(finished)
        return torch.tensor([float(len(r.split())) for r in responses])


def test_rm_win_rate_equals_the_hand_count(policies: Policies, tmp_path: Path) -> None:
    scorer = WordCountScorer()
    ctx = make_ctx(tmp_path, NoGoldTask())
    summary = compare(ctx, policies, Evaluators(gold=False, scorer=scorer, scorer_source="test"))
    rows = table(tmp_path)
    words_pol = [len(r["policy"].split()) for r in rows]
    words_base = [len(r["baseline"].split()) for r in rows]
    pairs = zip(words_pol, words_base, strict=True)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs)
    assert summary["rm_win_rate"] == pytest.approx(wins / PAIRS)
    # Whether each response ended reaches the reward model (a cut one is scored unterminated).
    assert [len(f) for f in scorer.finished] == [PAIRS, PAIRS]
    assert all(isinstance(v, bool) for f in scorer.finished for v in f)
    assert summary["rm_score_policy"] == pytest.approx(sum(words_pol) / PAIRS)
    assert summary["rm_score_baseline"] == pytest.approx(sum(words_base) / PAIRS)
    assert [r["policy rm"] for r in rows] == words_pol
    assert summary["win_rate"] == summary["rm_win_rate"]
    assert summary["win_rate_source"] == "reward_model"
    # Prompts reach the reward model as text, and as the conversation when the task has one
    # (here none: NoGoldTask has no prompt_messages), which the model renders in its format.
    assert scorer.prompts[0] == TASK.format_prompt(record_of(rows[0]["prompt"]))
    assert scorer.conversations == [TASK.format_prompt(record_of(r["prompt"])) for r in rows] * 2


def test_the_reward_model_gets_each_prompt_as_a_conversation(
    policies: Policies, tmp_path: Path
) -> None:
    """A task with conversations hands them to the reward model, so it scores the pair in the
    format it was trained in (its own chat template), not the judge's readable text."""
    scorer = WordCountScorer()
    ctx = make_ctx(tmp_path, TASK)
    compare(ctx, policies, Evaluators(gold=True, scorer=scorer, scorer_source="test"))
    rows = table(tmp_path)
    want = [TASK.prompt_messages(record_of(r["prompt"])) for r in rows]
    assert scorer.conversations == want * 2  # the policy's samples, then the baseline's


@pytest.fixture(scope="module")
def rm_folder(policies: Policies, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (randomly headed) reward model on the SFT backbone, saved; and a two-member copy."""
    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(policies.folder / "sft")
    root = tmp_path_factory.mktemp("rm")
    model.save_pretrained(root / "rm", policies.tokenizer)
    for i in range(2):
        model.save_pretrained(root / "ens" / f"member_{i}", policies.tokenizer)
    return root


def test_reward_model_comes_from_eval_config_or_the_run(rm_folder: Path, tmp_path: Path) -> None:
    ev = build_evaluators(make_ctx(tmp_path))  # the gold oracle alone
    assert ev.gold and ev.scorer is None and ev.judge is None

    node = {"path": str(rm_folder / "rm"), "batch_size": 8, "max_length": None}
    ctx = make_ctx(tmp_path, reward={"gold": {"weight": 1.0}, "bradley_terry": node})
    ctx.cfg.eval.reward_model = str(rm_folder / "ens")
    ev = build_evaluators(ctx)
    assert isinstance(ev.scorer, EnsembleScorer) and len(ev.scorer.members) == 2
    assert ev.scorer_source == f"eval.reward_model={rm_folder / 'ens'}"

    ctx.cfg.eval.reward_model = None  # the run's own learned reward
    ev = build_evaluators(ctx)
    assert isinstance(ev.scorer, RewardScorer) and ev.scorer_source == "reward.bradley_terry"

    ctx.cfg.eval.reward_model = str(tmp_path)  # no reward model there
    with pytest.raises(ConfigError, match=r"eval\.reward_model="):
        build_evaluators(ctx)


def test_reward_model_only_evaluation_scores_with_the_saved_model(
    policies: Policies, rm_folder: Path, tmp_path: Path
) -> None:
    ctx = make_ctx(tmp_path, NoGoldTask())
    ctx.cfg.eval.reward_model = str(rm_folder / "rm")
    summary = compare(ctx, policies)
    rows = table(tmp_path)
    scorer = RewardScorer(ScalarHeadModel.from_pretrained(rm_folder / "rm"), policies.tokenizer)
    prompts = [TASK.format_prompt(record_of(r["prompt"])) for r in rows]

    def scores(side: str) -> list[float]:
        """Each row scored as the saved model scores it: a response that ended with EOS, or
        one cut at the length limit, which is scored unterminated (the table does not say
        which, so the recorded value must be one of the two)."""
        texts = [r[side] for r in rows]
        ended = scorer.score(prompts, texts, finished=[True] * len(texts)).tolist()
        cut = scorer.score(prompts, texts, finished=[False] * len(texts)).tolist()
        out = []
        for row, a, b in zip(rows, ended, cut, strict=True):
            recorded = row[f"{side} rm"]
            assert recorded in (pytest.approx(round(a, 3)), pytest.approx(round(b, 3)))
            out.append(a if recorded == pytest.approx(round(a, 3)) else b)
        return out

    r_pol, r_base = scores("policy"), scores("baseline")
    assert summary["rm_score_policy"] == pytest.approx(sum(r_pol) / PAIRS, abs=1e-5)
    assert summary["rm_win_rate"] == pytest.approx(win_rate(r_pol, r_base))
    assert summary["win_rate_source"] == "reward_model"


# -------------------------------------------------------------------------------------------
# config errors and the command line
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("judge", "message"),
    [
        ({}, r"nothing to judge.*eval\.reward_model.*eval\.judge\.backend"),
        ({"backend": "openai"}, r"eval\.judge\.backend='openai'"),
        ({"backend": "http"}, r"eval\.judge\.url is not set"),
        ({"backend": "local"}, r"eval\.judge\.path is not set"),
        ({"backend": "http", "url": "http://x/v1", "on_error": "fallback"}, "fallback_value"),
        ({"backend": "http", "url": "http://x/v1", "endpoint": "grpc"}, r"eval\.judge\.endpoint"),
        ({"backend": "http", "url": "http://x/v1", "api_key_env": "sk-123"}, "api_key_env"),
    ],
)
def test_bad_evaluation_configs_name_the_key(tmp_path: Path, judge: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_evaluators(make_ctx(tmp_path, NoGoldTask(), **judge))


def test_stage_eval_cli_writes_the_judged_win_rate(
    sft_run: Path, stub_factory: Any, tmp_path: Path
) -> None:
    stub = stub_factory(gold_rule)
    proc = run_cli(
        [
            "stage=eval",
            *SMOKE,
            f"eval.policy={sft_run / 'sft'}",
            f"eval.baseline={sft_run / 'base_model'}",
            "eval.num_prompts=8",
            "eval.samples_per_prompt=1",
            "eval.judge.backend=http",
            f"eval.judge.url={stub.url}",
            f"run_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert stub.count == 2 * 8
    assert summary["win_rate"] == summary["gold_win_rate"]
    assert summary["win_rate_source"] == "gold"
    assert summary["judge_win_rate"] == pytest.approx(summary["gold_win_rate"])
    assert "win_rate is the gold win-rate" in proc.stderr  # the console is stderr
    assert "judge P(policy)" in json.loads((tmp_path / "eval_samples.json").read_text())["columns"]


def test_eval_judge_keys_are_typed_and_take_the_ready_made_judge_nodes() -> None:
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    from alignkit.cli import registration

    registration()
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        cfg = compose("config", overrides=["stage=eval", "+judge@eval.judge=openai"])
        with pytest.raises(ConfigCompositionException, match="bakend"):
            compose("config", overrides=["stage=eval", "eval.judge.bakend=http"])
    judge = cfg.eval.judge
    assert judge.backend == "http" and judge.endpoint == "chat" and judge.template == "general"
    assert judge.api_key_env == "OPENAI_API_KEY" and judge.both_orders is True
    assert cfg.eval.reward_model is None
