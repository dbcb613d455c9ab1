"""``stage=pipeline`` (the default): SFT -> RL -> gold evaluation, in one run directory."""

from __future__ import annotations

from alignkit.context import RunContext
from alignkit.stages.common import load_model
from alignkit.stages.evaluate import compare_policies
from alignkit.stages.rl import run_rl
from alignkit.stages.sft import run_sft


def run_pipeline(ctx: RunContext) -> dict[str, float]:
    summary: dict[str, float] = {}
    summary.update(run_sft(ctx))
    sft_dir = ctx.run_dir / "sft"
    rl_summary, rl_ctx = run_rl(ctx, sft_dir)
    summary.update(rl_summary)
    sft_policy, _ = load_model(ctx, sft_dir)
    rl_ctx.policy.eval()
    summary.update(compare_policies(ctx, rl_ctx.policy, sft_policy, rl_ctx.tokenizer))
    return summary
