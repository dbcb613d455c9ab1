"""RL tensor math (KL, GAE, clipped losses, aggregation, baselines) against hand arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rl.kl_control import (
    KL_STATE_KEY,
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    kl_controller_from_state,
    save_kl_controller,
)
from alignkit.rl.ops import (
    aggregate_loss,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_normalized_advantages,
    kl_penalty,
    leave_one_out_baseline,
    per_token_rewards,
    returns_to_go,
    whiten_advantages,
)

NAN = float("nan")

# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_estimators_hand_computed() -> None:
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    # d = logp - ref = [0.5, -1.0]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    # k2 = d^2 / 2 = [0.125, 0.5]
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    # k3 = exp(-d) - 1 + d = [e^-0.5 - 0.5, e^1 - 2] = [0.1065307, 0.7182818]
    expected = torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), expected)


def test_kl_estimators_vanish_when_policies_agree_and_reject_unknown_names() -> None:
    x = torch.tensor([-0.3, -2.0])
    for name in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(x, x, name), torch.zeros(2))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(x, x, "k4")


# ---------------------------------------------------------------------------------------------
# rewards, GAE, whitening
# ---------------------------------------------------------------------------------------------

# Row 0: three valid tokens. Row 1: two valid tokens, then padding holding garbage.
GAE_REWARDS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
GAE_VALUES = torch.tensor([[0.5, 0.4, 0.8], [1.0, 0.5, NAN]])
GAE_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_gae_gamma_one_lambda_095_with_padding() -> None:
    adv, ret = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=0.95)
    # Row 0, backwards (the last token bootstraps with 0):
    #   t=2: delta = 1 + 0 - 0.8 = 0.2                  A = 0.2
    #   t=1: delta = 0 + 0.8 - 0.4 = 0.4                A = 0.4 + 0.95 * 0.2 = 0.59
    #   t=0: delta = 0 + 0.4 - 0.5 = -0.1               A = -0.1 + 0.95 * 0.59 = 0.4605
    # Row 1 ends at t=1 (the 5.0 reward and nan value at t=2 are padding):
    #   t=1: delta = 2 + 0 - 0.5 = 1.5                  A = 1.5
    #   t=0: delta = 0 + 0.5 - 1.0 = -0.5               A = -0.5 + 0.95 * 1.5 = 0.925
    expected_adv = torch.tensor([[0.4605, 0.59, 0.2], [0.925, 1.5, 0.0]])
    torch.testing.assert_close(adv, expected_adv)
    # returns = A + V: [0.9605, 0.99, 1.0] and [1.925, 2.0, 0 (padding)]
    torch.testing.assert_close(ret, torch.tensor([[0.9605, 0.99, 1.0], [1.925, 2.0, 0.0]]))


def test_gae_discounted() -> None:
    adv, _ = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=0.9, lam=0.95)
    # gamma * lam = 0.855. Row 0:
    #   t=2: delta = 1 - 0.8 = 0.2                          A = 0.2
    #   t=1: delta = 0.9 * 0.8 - 0.4 = 0.32                 A = 0.32 + 0.855 * 0.2 = 0.491
    #   t=0: delta = 0.9 * 0.4 - 0.5 = -0.14                A = -0.14 + 0.855 * 0.491 = 0.279805
    # Row 1:
    #   t=1: delta = 2 - 0.5 = 1.5                          A = 1.5
    #   t=0: delta = 0.9 * 0.5 - 1.0 = -0.55                A = -0.55 + 0.855 * 1.5 = 0.7325
    expected = torch.tensor([[0.279805, 0.491, 0.2], [0.7325, 1.5, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_returns_to_go_is_gae_without_critic() -> None:
    # gamma = 1: G_t = sum of the rewards from t on; row 1 ignores its padded 5.0.
    got = returns_to_go(GAE_REWARDS, GAE_MASK, gamma=1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    # gamma = 0.5: row 0 -> [0.25, 0.5, 1], row 1 -> [1, 2, 0]
    got = returns_to_go(GAE_REWARDS, GAE_MASK, gamma=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]))


def test_whiten_advantages_uses_valid_tokens_only() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, NAN]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # valid values 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    std = math.sqrt(5 / 3)
    expected = torch.tensor([[-1.5, -0.5, 0.5], [1.5, 0.0, 0.0]]) / std
    expected[1, 1:] = 0.0
    torch.testing.assert_close(whiten_advantages(x, mask), expected)


def test_per_token_rewards_put_score_on_last_token_and_kl_everywhere() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    got = per_token_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.5)
    # row 0: -0.5 * [0.1, 0.2, 0.3] + [0, 0, 1]   = [-0.05, -0.1, 0.85]
    # row 1: -0.5 * [0.4, -0.2] + [0, -1], pad 0  = [-0.2, -0.9, 0]
    torch.testing.assert_close(got, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, -0.9, 0.0]]))


def test_reinforce_pp_advantages_whitened_returns_to_go() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, -0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards = per_token_rewards(torch.tensor([1.0, -1.0]), kl, mask, kl_coef=0.5)
    adv = whiten_advantages(returns_to_go(rewards, mask, 1.0), mask)
    # returns-to-go of the rewards above: row 0 [0.7, 0.75, 0.85], row 1 [-1.1, -0.9]
    # mean of the 5 valid values = 0.3 / 5 = 0.06; deviations 0.64, 0.69, 0.79, -1.16, -0.96
    # squares sum to 0.4096 + 0.4761 + 0.6241 + 1.3456 + 0.9216 = 3.777; unbiased var 3.777/4
    std = math.sqrt(3.777 / 4)
    expected = torch.tensor([[0.64, 0.69, 0.79], [-1.16, -0.96, 0.0]]) / std
    expected[1, 2] = 0.0
    torch.testing.assert_close(adv, expected)


# ---------------------------------------------------------------------------------------------
# group baselines
# ---------------------------------------------------------------------------------------------

# Groups need not be contiguous: g0 = rows 0, 2, 4; g1 = rows 1, 5; g2 = rows 3, 6.
GROUP_IDS = torch.tensor([0, 1, 0, 2, 0, 1, 2])
GROUP_REWARDS = torch.tensor([1.0, 0.5, 0.0, 3.0, 2.0, 0.5, 1.0])


def test_grpo_group_normalized_advantages() -> None:
    # g0 = [1, 0, 2]: mean 1, unbiased std sqrt((0 + 1 + 1) / 2) = 1 -> [0, -1, 1]
    # g1 = [0.5, 0.5]: std 0 -> advantages 0 (no signal, no division blow-up)
    # g2 = [3, 1]: mean 2, std sqrt((1 + 1) / 1) = sqrt 2 -> [1/sqrt2, -1/sqrt2]
    s = 1 / math.sqrt(2)
    got = group_normalized_advantages(GROUP_REWARDS, GROUP_IDS, scale=True)
    torch.testing.assert_close(
        got, torch.tensor([0.0, 0.0, -1.0, s, 1.0, 0.0, -s]), atol=1e-5, rtol=0
    )
    # centring only: g0 -> [0, -1, 1], g1 -> 0, g2 -> [1, -1]
    got = group_normalized_advantages(GROUP_REWARDS, GROUP_IDS, scale=False)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -1.0, 1.0, 1.0, 0.0, -1.0]))


def test_rloo_baseline_excludes_the_sample_itself() -> None:
    base = leave_one_out_baseline(GROUP_REWARDS, GROUP_IDS)
    # g0 = [1, 0, 2] (sum 3): baselines (3-1)/2 = 1, (3-0)/2 = 1.5, (3-2)/2 = 0.5
    # g1 = [0.5, 0.5]: each sees the other, 0.5; g2 = [3, 1]: baselines 1 and 3
    torch.testing.assert_close(base, torch.tensor([1.0, 0.5, 1.5, 1.0, 0.5, 0.5, 3.0]))
    # advantages r - b: g0 [0, -1.5, 1.5] = k/(k-1) * (r - mean) = 1.5 * [0, -1, 1]
    adv = GROUP_REWARDS - base
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.5, 2.0, 1.5, 0.0, -2.0]))


def test_rloo_baseline_needs_two_samples_per_group() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_baseline(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))


# ---------------------------------------------------------------------------------------------
# clipped losses
# ---------------------------------------------------------------------------------------------


def _policy_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Ratios [[1.5, 0.5, pad], [1.1, 0.7, pad]]; the padded column holds a huge log-ratio.
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.1, 0.7, 1.0]]))
    logp[:, 2] = 500.0
    adv = torch.tensor([[1.0, 1.0, 7.0], [-1.0, -2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    return logp.requires_grad_(True), old, adv, mask


def test_clipped_policy_loss_and_clipfrac() -> None:
    logp, old, adv, mask = _policy_case()
    loss, clipfrac = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # L = max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=1,  r=1.5: max(-1.5, -1.2) = -1.2  (clipped term active)
    #   A=1,  r=0.5: max(-0.5, -0.8) = -0.5
    #   A=-1, r=1.1: max(1.1, 1.1)   = 1.1   (inside the range)
    #   A=-2, r=0.7: max(1.4, 1.6)   = 1.6   (clipped term active)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5, 0.0], [1.1, 1.6, 0.0]]))
    assert clipfrac.item() == pytest.approx(2 / 4)
    # dL/dlogp = -A r where unclipped, 0 where clipped or padded (no nan from the padding).
    loss.sum().backward()
    expected_grad = torch.tensor([[0.0, -0.5, 0.0], [1.1, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected_grad)


def test_clipped_policy_loss_asymmetric_range() -> None:
    logp, old, adv, mask = _policy_case()
    loss, clipfrac = clipped_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    # the upper bound is now 1.6, so r=1.5 with A=1 is no longer clipped: -1.5
    assert loss[0, 0].item() == pytest.approx(-1.5)
    assert clipfrac.item() == pytest.approx(1 / 4)


def test_clipped_value_loss() -> None:
    values = torch.tensor([[1.0, 0.0, 2.0, 50.0]])
    old = torch.tensor([[0.5, 0.5, 2.0, 0.0]])
    returns = torch.tensor([[2.0, 0.4, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clipfrac = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # token 0: V_clip = 0.5 + 0.2 = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 0.5 * 1.69 = 0.845
    # token 1: V_clip = 0.5 - 0.2 = 0.3; (0-0.4)^2 = 0.16, (0.3-0.4)^2 = 0.01 -> 0.08
    # token 2: V_clip = V = 2; (2-1)^2 = 1 -> 0.5; token 3 is padding -> 0
    torch.testing.assert_close(loss, torch.tensor([[0.845, 0.08, 0.5, 0.0]]))
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    # residual [-0.5, 0.5, -0.5, 0.5]: var 1/3; var(returns) = 5/3 -> 1 - 1/5 = 0.8
    values = torch.tensor([[1.5, 1.5, 3.5, 3.5, -7.0]])
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.8)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 5), returns, mask).item() == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# loss aggregation and gradient accumulation
# ---------------------------------------------------------------------------------------------

# Row lengths 4, 2, 1, 2; padding holds garbage. Valid tokens: 9, their sum 45.
AGG_LOSS = torch.tensor(
    [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, 3.0], [7.0, 9.0, 9.0, 9.0], [8.0, 9.0, 1.0, 1.0]]
)
AGG_MASK = torch.tensor(
    [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
)


@pytest.mark.parametrize(
    ("mode", "expected", "max_len"),
    [
        ("token_mean", 45 / 9, None),  # every token: 45 / 9 = 5
        # per-row means 10/4, 11/2, 7/1, 17/2 = 2.5, 5.5, 7, 8.5 -> 23.5 / 4 = 5.875
        ("seq_mean_token_mean", 5.875, None),
        ("seq_mean_token_sum_norm", 45 / (4 * 4), None),  # L defaults to R = 4
        ("seq_mean_token_sum_norm", 45 / (4 * 10), 10),  # L = 10
    ],
)
def test_aggregate_loss_modes(mode: str, expected: float, max_len: int | None) -> None:
    got = aggregate_loss(AGG_LOSS, AGG_MASK, mode, max_len=max_len)
    assert got.item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_loss_accumulated_halves_equal_the_full_batch(mode: str) -> None:
    full_in = AGG_LOSS.clone().requires_grad_(True)
    full = aggregate_loss(full_in, AGG_MASK, mode)
    full.backward()

    acc_in = AGG_LOSS.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        # global counts of the whole batch: 9 tokens, 4 sequences, L = 4
        part = aggregate_loss(
            acc_in[rows], AGG_MASK[rows], mode, num_tokens=9, num_seqs=4, max_len=4
        )
        part.backward()
        total += part.item()
    # token_mean halves: 21/9 + 24/9; seq_mean: (2.5+5.5)/4 + (7+8.5)/4; sum_norm: 21/16 + 24/16
    assert total == pytest.approx(full.item())
    torch.testing.assert_close(acc_in.grad, full_in.grad)
    assert not torch.isnan(acc_in.grad).any()


def test_local_token_means_would_not_match_the_full_batch() -> None:
    # Why global counts: the halves hold 6 and 3 tokens, so averaging local means gives
    # (21/6 + 24/3) / 2 = 5.75, not the full-batch 5.
    halves = [aggregate_loss(AGG_LOSS[r], AGG_MASK[r]) for r in (slice(0, 2), slice(2, 4))]
    assert sum(h.item() for h in halves) / 2 == pytest.approx(5.75)


def test_aggregate_loss_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="token_sum"):
        aggregate_loss(AGG_LOSS, AGG_MASK, "token_sum")


# ---------------------------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_update() -> None:
    ctl = AdaptiveKLController(coef=0.1, target=6.0, horizon=10_000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to 0.2 -> beta = 0.1 * (1 + 0.2 * 1000/10000) = 0.102
    assert ctl.update(9.0, n_steps=1000) == pytest.approx(0.102)
    # KL 5.4: error -0.1 -> beta = 0.102 * (1 - 0.1 * 500/10000) = 0.102 * 0.995 = 0.10149
    assert ctl.update(5.4, n_steps=500) == pytest.approx(0.10149)
    # on target: no change
    assert ctl.update(6.0, n_steps=500) == pytest.approx(0.10149)


def test_fixed_kl_controller_never_moves() -> None:
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05


def test_kl_controller_state_is_json_and_restores() -> None:
    state: dict = {}
    ctl = build_kl_controller("adaptive", 0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # 0.1 * (1 + 0.2 * 10/100) = 0.102
    save_kl_controller(state, ctl)
    restored_state = json.loads(json.dumps(state))
    again = kl_controller_from_state(restored_state, "adaptive", 0.1, target=6.0, horizon=100)
    assert again.coef == pytest.approx(0.102)
    assert KL_STATE_KEY in state
    fresh = kl_controller_from_state({}, "adaptive", 0.1, target=6.0, horizon=100)
    assert fresh.coef == 0.1


def test_kl_controller_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="pid"):
        build_kl_controller("pid", 0.1)
    with pytest.raises(ConfigError, match="target"):
        build_kl_controller("adaptive", 0.1, target=0.0)
