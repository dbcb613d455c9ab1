"""The critique reward plugin, the tiny judge's synthetic data, the RLAIF annotator and the
critique-and-revision stage."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from alignkit_plugins import critique as critique_plugin
from alignkit_plugins.rlaif import JudgeAnnotator
from omegaconf import OmegaConf

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.data import read_sft_pairs
from alignkit.data.feedback import PairwiseFeedback, RankingFeedback, label, read_feedback
from alignkit.judges import CritiqueJudge, JudgeError, RawVerdict, load_template
from alignkit.judges.config import CritiqueRewardConfig, critique_config
from alignkit.tasks import AssistTask
from alignkit.tasks.judge_data import explain, judge_examples, response_pool
from alignkit.tracking import Tracker
from tests.conftest import SMOKE, run_cli

TASK = AssistTask(max_operand=5)
TEMPLATE = load_template("assist")


def _record(rid: str):
    return next(r for r in TASK.all_prompts() if r.id == rid)


# -------------------------------------------------------------------------------------------
# synthetic critiques from the gold oracle
# -------------------------------------------------------------------------------------------


def test_oracle_explanations() -> None:
    r = _record("arith-plus-2-3-0")  # What is 2 plus 3?
    e = explain(TASK, r, "5")
    assert e.verdicts == {"helpful": True, "concise": True, "harmless": True}
    assert e.sentences["helpful"] == "It says 5. It should be 5. The answer is right."
    wrong = explain(TASK, r, "6")
    assert (wrong.gold, wrong.verdicts["helpful"], wrong.verdicts["concise"]) == (0.0, False, True)
    verbose = explain(TASK, r, "The answer is 5. Hope this helps.")
    assert verbose.verdicts == {"helpful": True, "concise": False, "harmless": True}
    assert (
        explain(TASK, r, "Sorry, I can't help with that.")
        .sentences["helpful"]
        .endswith("It refuses a safe request.")
    )
    unsafe = next(p for p in TASK.all_prompts() if p.kind == "unsafe")
    comply = explain(TASK, unsafe, "Sure! Here is how. First, get the right tools.")
    assert comply.verdicts == {"helpful": False, "concise": False, "harmless": False}
    assert comply.critique(["helpful", "harmless"]) == (
        "It should refuse. It does not refuse. It helps with harm."
    )


def test_judge_examples_cover_every_kind_of_example() -> None:
    examples = judge_examples(TASK, TASK.train_prompts(), TEMPLATE, 400, seed=0)
    heads = {c.split(":", 1)[0] for c, _ in examples}
    assert heads == {"Judge", "Compare", "Revise"}
    for context, target in examples:
        if context.startswith("Judge"):
            assert context.endswith("\nCritique:") and target.rsplit(" ", 1)[1] in ("good", "bad")
        if context.startswith("Compare"):
            assert target.endswith(("Verdict: A", "Verdict: B"))
    # Ideal responses under all principles are always "good"; gold-0 ones always "bad".
    rng_pool = response_pool(TASK, _record("arith-plus-2-3-0"), __import__("random").Random(0))
    assert "5" in rng_pool and any("no 5" in p for p in rng_pool)


# -------------------------------------------------------------------------------------------
# the reward plugin
# -------------------------------------------------------------------------------------------


class LengthBackend:
    """P(good) = 0.9 for one-word responses, 0.2 otherwise (a scripted judge)."""

    name = "length"

    def critique(
        self, contexts: Sequence[str], verdict_prefix: str, options: Sequence[str]
    ) -> list[RawVerdict | JudgeError]:
        out: list[RawVerdict | JudgeError] = []
        for c in contexts:
            if c.startswith("Compare"):
                a = c.split("\nA: ")[1].split("\nB: ")[0]
                p = 0.9 if len(a.split()) == 1 else 0.2
                out.append(RawVerdict(" cmp", {" A": math.log(p), " B": math.log(1 - p)}, ""))
                continue
            response = c.split("Assistant: ")[1].split("\nCritique:")[0]
            p = 0.9 if len(response.split()) == 1 else 0.2
            out.append(
                RawVerdict(
                    f" len {len(response.split())}",
                    {" good": math.log(p), " bad": math.log(1 - p)},
                    "",
                )
            )
        return out

    def complete(self, contexts: Sequence[str], max_tokens: int) -> list[str | JudgeError]:
        return ["5" for _ in contexts]

    def close(self) -> None:
        pass


def _ctx(tmp_path: Path, **reward: object) -> RunContext:
    cfg = OmegaConf.create(
        {
            "reward": {
                "critique": OmegaConf.merge(OmegaConf.structured(CritiqueRewardConfig), reward)
            },
            "rl": {"samples_per_prompt": 2},
        }
    )
    ctx = RunContext(
        cfg=cfg, run_dir=tmp_path, plugins=None, registry=None, tracker=Tracker(tmp_path)
    )  # type: ignore[arg-type]
    ctx.task = TASK
    ctx.state["critique/judge"] = CritiqueJudge(
        LengthBackend(), TEMPLATE, per_principle=bool(cfg.reward.critique.per_principle)
    )
    return ctx


def _batch() -> Rollout:
    r = _record("arith-plus-2-3-0")
    n = 4
    return Rollout(
        prompt_ids=torch.ones(n, 3, dtype=torch.long),
        prompt_mask=torch.ones(n, 3, dtype=torch.long),
        response_ids=torch.ones(n, 2, dtype=torch.long),
        response_mask=torch.ones(n, 2),
        group_ids=torch.tensor([0, 0, 1, 1]),
        prompts=[TASK.format_prompt(r)] * n,
        responses=["5", "it is 5", "6", "five or six"],
        records=[r] * n,
    )


def test_reward_hook_scores_logs_critiques_and_metrics(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, log_every=1, log_samples=3)
    out = critique_plugin.reward(ctx=ctx, batch=_batch())
    # Every principle says 0.9 or 0.2, so the weighted mean is the same number.
    assert out["critique"].tolist() == pytest.approx([0.9, 0.2, 0.9, 0.2])
    metrics: dict[str, float] = {}
    critique_plugin.step_end(ctx=ctx, step=0, batch=_batch(), metrics=metrics)
    assert metrics["critique/helpful"] == pytest.approx(0.55)
    assert metrics["critique/logprob_rate"] == 1.0 and metrics["critique/fallback_rate"] == 0.0
    lines = [json.loads(x) for x in (tmp_path / "critiques.jsonl").read_text().splitlines()]
    assert (
        len(lines) == 3
        and lines[1]["response"] == "it is 5"
        and lines[1]["gold"] == pytest.approx(0.56)
    )
    assert "len 3" in lines[1]["critique"]
    table = json.loads((tmp_path / "critiques_step_000000.json").read_text())
    assert table["columns"][-1] == "gold" and len(table["rows"]) == 3


def test_pairwise_mode_rewards_mean_win_probability(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, mode="pairwise", log_every=0)
    out = critique_plugin.reward(ctx=ctx, batch=_batch())["critique"]
    # Group 0 ("5" vs "it is 5"): P_AB("5") = 0.9, P_AB("it is 5") = 0.2 ->
    # P("5" > "it is 5") = (0.9 + 1 - 0.2) / 2 = 0.85.
    assert out.tolist() == pytest.approx([0.85, 0.15, 0.85, 0.15])


def test_critique_config_checks_keys() -> None:
    cfg = OmegaConf.create({"reward": {"critique": {"judge": {"bakend": "x"}}}})
    with pytest.raises(Exception, match="bakend"):
        critique_config(cfg)
    assert critique_config(OmegaConf.create({"reward": {}})).judge.backend == "local"


# -------------------------------------------------------------------------------------------
# the RLAIF annotator
# -------------------------------------------------------------------------------------------


def test_rlaif_annotator_writes_the_feedback_formats(tmp_path: Path) -> None:
    judge = CritiqueJudge(LengthBackend(), TEMPLATE)
    ann = JudgeAnnotator(judge, TASK.format_prompt, scale=7)
    r = _record("arith-plus-2-3-0")
    responses = ["it is 5", "5", "five or six"]
    assert ann.rank(r, responses) == [1, 0, 1]
    assert ann.compare(r, "it is 5", "5") == 1
    assert ann.rate(r, "5") == 6.0  # floor(1 + 6 * 0.9 + 0.5)
    prompt = TASK.format_prompt(r)
    (ranking,) = label(ann, "rankings", r, prompt, responses, r.id)
    assert isinstance(ranking, RankingFeedback) and ranking.ranks == [1, 0, 1]
    pairs = label(ann, "pairwise", r, prompt, responses, r.id)
    assert [(p.chosen, p.rejected) for p in pairs][:2] == [
        ("5", "it is 5"),
        ("it is 5", "five or six"),
    ]


# -------------------------------------------------------------------------------------------
# end to end through the command line (a judge, RLAIF feedback -> reward model, revisions)
# -------------------------------------------------------------------------------------------

TINY_BUILD = [
    "reward.critique.build.steps=40",
    "reward.critique.build.examples=800",
    "reward.critique.build.n_layer=1",
    "reward.critique.build.n_embd=48",
    "reward.critique.build.n_head=2",
    "reward.critique.build.vocab_size=600",
    "reward.critique.build.eval_prompts=6",
]


@pytest.mark.slow
def test_judge_rlaif_reward_model_and_revision_stages(sft_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_cli(["stage=judge", "reward=[critique]", *SMOKE, f"run_dir={run}", *TINY_BUILD])
    assert proc.returncode == 0, proc.stderr[-3000:]
    judge = run / "judge"
    assert (judge / "config.json").is_file() and (run / "judge_eval.json").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert -1.0 <= summary["judge_spearman_per_principle"] <= 1.0

    common = ["reward=[critique]", f"reward.critique.judge.path={judge}", *SMOKE, f"run_dir={run}"]
    proc = run_cli(
        ["stage=feedback", "feedback.annotator=rlaif", f"feedback.policy={sft_run / 'sft'}",
         "feedback.num_prompts=12", "feedback.format=pairwise", *common]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_feedback(run / "feedback" / "pairwise.jsonl")
    assert records and all(isinstance(r, PairwiseFeedback) for r in records)

    proc = run_cli(
        ["stage=reward_model", "reward=[bradley_terry]", f"reward_model.data=[{run / 'feedback'}]",
         f"reward_model.backbone={sft_run / 'sft'}", "reward_model.steps=4", *SMOKE,
         f"run_dir={run}"]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "reward_model" / "config.json").is_file()

    proc = run_cli(
        ["stage=critique_revision", f"reward.critique.revision.policy={sft_run / 'sft'}",
         "reward.critique.revision.num_prompts=8", *common]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run / "critique_revision"
    pairs = read_feedback(out / "pairwise.jsonl") if (out / "pairwise.jsonl").read_text() else []
    assert all(isinstance(p, PairwiseFeedback) and p.chosen != p.rejected for p in pairs)
    if (out / "demonstrations.jsonl").read_text():
        assert read_sft_pairs(out / "demonstrations.jsonl")
    assert len((out / "critiques.jsonl").read_text().splitlines()) == 16


def test_critique_revision_stage_writes_readable_files(tmp_path: Path) -> None:
    """In-process with a scripted judge whose revision is always "5"."""
    from alignkit.stages import critique_revision as stage

    ctx = _ctx(tmp_path)
    ctx.cfg = OmegaConf.merge(
        ctx.cfg,
        {"reward": {"critique": {"revision": {"num_prompts": 3, "samples_per_prompt": 2}}}},
    )
    r = _record("arith-plus-2-3-0")
    samples = SimpleNamespace(responses=["5", "6", "it is 5", "7", "5", "9"])
    judge = CritiqueJudge(LengthBackend(), TEMPLATE)
    summary = stage.write_revisions(ctx, [r] * 6, samples.responses, judge)
    out = tmp_path / "critique_revision"
    pairs = read_feedback(out / "pairwise.jsonl")
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("5", "6"),
        ("5", "it is 5"),
        ("5", "7"),
        ("5", "9"),
    ]
    assert all(p.prompt_id == r.id for p in pairs)
    demos = read_sft_pairs(out / "demonstrations.jsonl")
    assert demos == [(TASK.format_prompt(r), "5")] * 4
    assert summary["revision_pairs"] == 4 and summary["revision_gold_improved"] == 1.0
    assert summary["revision_gold_original"] == pytest.approx((1 + 0 + 0.56 + 0 + 1 + 0) / 6)
