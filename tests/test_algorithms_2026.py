"""GSPO, CISPO, Dr. GRPO, ReMax and DAPO: their losses, advantages and rewards against
hand-computed values, and one CLI run each on the built-in task."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from alignkit_plugins import cispo, dapo, dr_grpo, gspo, remax
from omegaconf import OmegaConf

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.tracking import Tracker, read_metrics

from .conftest import SMOKE, active_plugins, run_cli


def _ctx(module: object, algo: dict, **rl: object) -> RunContext:
    """A context with the core and ``module`` active and their components registered."""
    pm, registry = active_plugins(algo["name"], module)
    cfg = OmegaConf.create({"seed": 0, "algorithm": algo, "rl": {"kl_coef": 0.0, **rl}})
    return RunContext(
        cfg=cfg,
        run_dir=Path("."),
        plugins=pm,
        registry=registry,
        tracker=Tracker(Path("."), enabled=False),
    )


def _batch(rewards: list[float], group: int, lengths: list[int], width: int = 4) -> Rollout:
    rows = len(rewards)
    mask = torch.zeros(rows, width)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return Rollout(
        prompt_ids=torch.ones(rows, 1, dtype=torch.long),
        prompt_mask=torch.ones(rows, 1, dtype=torch.long),
        response_ids=torch.ones(rows, width, dtype=torch.long),
        response_mask=mask,
        group_ids=torch.arange(rows // group).repeat_interleave(group),
        rewards=torch.tensor(rewards),
    )


# ---------------------------------------------------------------------------------- GSPO


def test_gspo_ratio_is_the_length_normalised_sequence_ratio_clipped_per_sequence() -> None:
    # row 0: log-ratios [0.2, 0.0] -> s = exp(0.1) = 1.10517, A = 1: clipped at 1 + 0.05
    # row 1: log-ratio [-0.1] (one token) -> s = exp(-0.1) = 0.90484, A = -2: clipped at 0.95
    logp = torch.tensor([[-1.0, -2.0], [-1.1, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0], [-1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    per_token, clipfrac = gspo.gspo_loss(logp, old, adv, mask, 0.05, 0.05)
    # row 0: max(-1.10517, -1.05) = -1.05; row 1: max(2 * 0.90484, 2 * 0.95) = 1.9
    torch.testing.assert_close(per_token, torch.tensor([[-1.05, -1.05], [1.9, 0.0]]))
    assert clipfrac.item() == pytest.approx(1.0)
    per_token, clipfrac = gspo.gspo_loss(logp, old, adv, mask, 0.5, 0.5)
    s0 = math.exp(0.1)
    torch.testing.assert_close(per_token[0], torch.tensor([-s0, -s0]))
    assert clipfrac.item() == 0.0
    per_token[0, 0].backward()  # d(-s0)/d logp_0t = -s0 / |y_0|
    torch.testing.assert_close(logp.grad[0], torch.tensor([-s0 / 2, -s0 / 2]))
    torch.testing.assert_close(logp.grad[1], torch.zeros(2))


# ---------------------------------------------------------------------------------- CISPO


def test_cispo_weights_every_token_by_its_clipped_detached_ratio() -> None:
    # ratios e^0.5 = 1.6487 (clipped to 1.2), e^-0.2 = 0.8187 (kept), and a padded token
    logp = torch.tensor([[-0.5, -1.2, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, 0.0]])
    adv = torch.tensor([[2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    per_token, clipfrac = cispo.cispo_loss(logp, old, adv, mask, clip_eps=1.0, clip_eps_high=0.2)
    w1 = math.exp(-0.2)
    torch.testing.assert_close(per_token, torch.tensor([[-1.2 * 2 * -0.5, -w1 * 2 * -1.2, 0.0]]))
    assert clipfrac.item() == pytest.approx(0.5)
    per_token.sum().backward()
    # the gradient of each token is -w * A (the weight is a constant): clipped tokens keep one
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.2 * 2, -w1 * 2, 0.0]]))


# ------------------------------------------------------------------------------ Dr. GRPO


def test_dr_grpo_centres_without_the_std_and_normalises_by_the_budget() -> None:
    cfg = OmegaConf.structured(dr_grpo.DrGRPOConfig)
    assert (cfg.scale_rewards, cfg.loss_agg, cfg.advantage_estimator) == (
        False,
        "seq_mean_token_sum_norm",
        "grpo",
    )
    from alignkit_plugins import grpo

    ctx = _ctx(grpo, {**OmegaConf.to_container(cfg), "name": "grpo"})
    batch = _batch([1.0, 0.0, 3.0, 3.0], group=2, lengths=[2, 1, 3, 1])
    adv = grpo.grpo_advantages(ctx, batch)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]))  # centred only


# -------------------------------------------------------------------------------- ReMax


def test_remax_advantage_is_the_reward_minus_the_greedy_reward() -> None:
    ctx = _ctx(remax, {"name": "remax", "advantage_estimator": "remax"})
    batch = _batch([1.0, 0.2, 0.5, 0.9], group=2, lengths=[1, 1, 1, 1])
    batch.extras[remax.BASELINE] = torch.tensor([0.6, 0.6, 1.0, 1.0])
    torch.testing.assert_close(
        remax.remax_advantages(ctx, batch), torch.tensor([0.4, -0.4, -0.5, -0.1])
    )


# --------------------------------------------------------------------------------- DAPO


def test_dapo_overlong_shaping_is_soft_in_the_buffer_and_minus_one_at_the_limit() -> None:
    ctx = _ctx(dapo, {"name": "dapo", "overlong_buffer": 4}, max_new_tokens=10)
    batch = _batch([0.0] * 5, group=1, lengths=[6, 7, 8, 10, 3], width=10)
    # L_max - L_cache = 6: 6 -> 0, 7 -> -1/4, 8 -> -2/4, 10 -> -1, 3 -> 0
    torch.testing.assert_close(
        dapo.reward(ctx, batch)["overlong"], torch.tensor([0.0, -0.25, -0.5, -1.0, 0.0])
    )
    assert ctx.needs.reward_weights == {"overlong": 1.0}
    assert ctx.reward_weight("overlong") == 1.0  # declared: no config entry needed


def test_dapo_keeps_groups_whose_rewards_differ() -> None:
    batch = _batch([1.0, 1.0, 0.0, 1.0, 0.5, 0.5], group=2, lengths=[1] * 6)
    assert dapo.informative(batch).tolist() == [False, False, True, True, False, False]


# ------------------------------------------------------------------------- one run each


@pytest.mark.parametrize(
    ("algorithm", "keys"),
    [
        ("gspo", {"policy/clipfrac", "kl/loss"}),
        ("cispo", {"policy/clipfrac", "kl/loss"}),
        ("dr_grpo", {"policy/clipfrac", "kl/loss"}),
        ("remax", {"remax/baseline"}),
        ("dapo", {"reward/overlong", "dapo/informative_fraction"}),
    ],
)
def test_each_algorithm_runs_from_the_command_line(
    sft_run: Path, tmp_path: Path, algorithm: str, keys: set[str]
) -> None:
    args = ["stage=rl", f"algorithm={algorithm}", *SMOKE, "reward=[gold]"]
    proc = run_cli([*args, f"model.path={sft_run / 'sft'}", f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert keys | {"loss/policy", "gold/score", "policy/grad_norm"} <= set(row)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float)), row


# ------------------------------------------------------------ the first-party seven, as plugins

SEVEN = ("gspo", "dapo", "cispo", "remax", "dr_grpo", "dpo", "online_dpo")


@pytest.mark.parametrize("name", SEVEN)
def test_each_first_party_algorithm_is_small_and_imports_only_the_public_api(name: str) -> None:
    from .test_external_plugins import assert_public_imports_only, lines_of_code

    source = (Path(__file__).parents[1] / "plugins" / f"{name}.py").read_text()
    assert lines_of_code(source) <= 80, f"plugins/{name}.py: {lines_of_code(source)} lines of code"
    assert_public_imports_only(source, name)


def test_alignkit_plugins_lists_all_seven() -> None:
    proc = run_cli(["plugins"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = {line.split("│")[1].strip() for line in proc.stdout.splitlines() if "│" in line}
    assert set(SEVEN) <= listed, set(SEVEN) - listed
