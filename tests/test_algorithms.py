"""PPO, GRPO, RLOO and REINFORCE++: hand-computed advantages, updates on a tiny GPT-2,
gradient-accumulation invariance, PPO checkpoints, LoRA, and one CLI run per algorithm."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from alignkit_plugins import grpo, ppo, reinforce_pp, rloo
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.engine import batch_metrics
from alignkit.engine.checkpoint import load_checkpoint, save_checkpoint
from alignkit.errors import ConfigError
from alignkit.models import ScalarHeadModel, sequence_logprobs
from alignkit.rl import critic as critic_module
from alignkit.rl.critic import CRITIC_DIR, CRITIC_KEY, Critic
from alignkit.rl.ops import kl_penalty
from alignkit.tracking import Tracker, read_metrics
from alignkit.validate import check_algorithm_needs
from tests.conftest import SMOKE, active_plugins, run_cli

PLUGINS: dict[str, tuple[ModuleType, type]] = {
    "ppo": (ppo, ppo.PPOConfig),
    "grpo": (grpo, grpo.GRPOConfig),
    "rloo": (rloo, rloo.RLOOConfig),
    "reinforce_pp": (reinforce_pp, reinforce_pp.ReinforcePPConfig),
}

COMMON_KEYS = {
    "loss/policy",
    "loss/total",
    "kl/ref",
    "kl/coef",
    "kl/approx",
    "policy/clipfrac",
    "policy/entropy",
    "policy/grad_norm",
    "lr",
}
METRIC_KEYS = {
    "ppo": COMMON_KEYS | {"loss/value", "value/clipfrac", "value/explained_variance"},
    "grpo": COMMON_KEYS | {"kl/loss"},
    "rloo": COMMON_KEYS,
    "reinforce_pp": COMMON_KEYS,
}


def _cfg(name: str, algo: dict[str, Any] | None = None, **rl: Any) -> DictConfig:
    """A config with the algorithm's real schema defaults, overridden by ``algo``."""
    schema = PLUGINS[name][1]
    node = OmegaConf.merge(OmegaConf.structured(schema), algo or {})
    rl_cfg = {
        "kl_coef": 0.5,
        "kl_estimator": None,
        "temperature": 1.0,
        "max_new_tokens": 3,
        "keep_checkpoints": 2,
        "optim": {
            "lr": 1e-2,
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.0,
            "max_grad_norm": 1e9,
        },
        **rl,
    }
    return OmegaConf.create({"seed": 0, "model": {"path": None}, "rl": rl_cfg, "algorithm": node})


def _ctx(tmp_path: Path, cfg: DictConfig, **kw: Any) -> RunContext:
    name = str(cfg.algorithm.name)
    pm, registry = active_plugins(name, PLUGINS[name][0])
    kw.setdefault("plugins", pm)
    return RunContext(
        cfg=cfg,
        run_dir=tmp_path,
        registry=registry,
        tracker=Tracker(tmp_path, enabled=False),
        **kw,
    )


def _with_kl(ctx: RunContext, batch: Rollout) -> Rollout:
    """The per-token KL the rollout records with the reference log-probs."""
    if batch.ref_logprobs is not None:
        kl = kl_penalty(batch.logprobs, batch.ref_logprobs, ctx.kl_estimator)
        batch.kl = torch.where(batch.response_mask != 0, kl, 0.0)
    return batch


def _advantage(ctx: RunContext, batch: Rollout) -> Rollout:
    """The advantage phase as the engine calls it (the algorithm's, else the core's)."""
    return ctx.plugins.call("advantage", ctx=ctx, batch=_with_kl(ctx, batch))


def _update(ctx: RunContext, batch: Rollout) -> dict[str, float]:
    """The update phase, with the engine's batch metrics (``kl/ref``, ``kl/coef``)."""
    metrics = ctx.plugins.call("update", ctx=ctx, batch=batch)
    return {**batch_metrics(batch, float(ctx.cfg.rl.kl_coef)), **metrics}


def _policy(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=12,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def _batch() -> Rollout:
    """4 rows (2 prompts x 2 samples), P = 2, R = 3, with hand-chosen log-probs."""
    return Rollout(
        prompt_ids=torch.tensor([[0, 5], [0, 5], [6, 7], [6, 7]]),
        prompt_mask=torch.tensor([[0, 1], [0, 1], [1, 1], [1, 1]]),
        response_ids=torch.tensor([[8, 1, 0], [9, 9, 1], [3, 1, 0], [4, 4, 4]]),
        response_mask=torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        logprobs=torch.tensor(
            [[-1.0, -1.0, 0], [-2.0, -1.0, -1.0], [-0.5, -0.5, 0], [-1, -1, -1.0]]
        ),
        ref_logprobs=torch.tensor(
            [[-1.5, -1.0, 0], [-1.0, -1.0, -1.0], [-0.5, -1, 0], [-1, -1, -1.0]]
        ),
    )


def _on_policy_batch(policy: nn.Module) -> Rollout:
    """``_batch`` with the policy's own log-probs, as the rollout would record them."""
    batch = _batch()
    ids, mask = batch.sequences()
    with torch.no_grad():
        logp = sequence_logprobs(policy, ids, mask, 2) * batch.response_mask
    batch.logprobs = logp
    batch.ref_logprobs = (logp - 0.1) * batch.response_mask  # k1 KL of 0.1 per token
    return batch


# ---------------------------------------------------------------------------------------------
# advantages on a hand-built batch
# ---------------------------------------------------------------------------------------------
# Per-token k1 KL of _batch (logp - ref): row0 [0.5, 0], row1 [-1, 0, 0], row2 [0, 0.5],
# row3 [0, 0, 0]; per sequence [0.5, -1.0, 0.5, 0.0].


def test_grpo_advantage_is_group_standardised_reward(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _cfg("grpo"))
    batch = _advantage(ctx, _batch())
    # group 0 rewards [1, 0]: mean 0.5, unbiased std sqrt(0.25 + 0.25) = 0.70711 -> +-0.70711
    # group 1 rewards [0.5, 0.5]: no spread -> 0
    a = 0.5 / math.sqrt(0.5)
    expected = torch.tensor([[a, a, 0], [-a, -a, -a], [0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(batch.advantages, expected, atol=1e-5, rtol=0)
    # k3 KL per sequence: exp(-d) - 1 + d summed: row0 e^-0.5 - 0.5, row1 e - 2, row2 as row0
    k3 = math.exp(-0.5) - 0.5
    torch.testing.assert_close(batch.kl.sum(1), torch.tensor([k3, math.e - 2.0, k3, 0.0]))


def test_grpo_advantage_without_std_scaling(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _cfg("grpo", {"scale_rewards": False}))
    batch = _advantage(ctx, _batch())
    # centring only: group 0 -> [0.5, -0.5]
    assert batch.advantages[0, 0].item() == pytest.approx(0.5)
    assert batch.advantages[1, 2].item() == pytest.approx(-0.5)


def test_rloo_advantage_subtracts_kl_then_leave_one_out_baseline(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _cfg("rloo"))
    batch = _advantage(ctx, _batch())
    # shaped s = r - 0.5 * KL_seq = [1 - 0.25, 0 + 0.5, 0.5 - 0.25, 0.5] = [0.75, 0.5, 0.25, 0.5]
    # baseline = the other sample of the group: [0.5, 0.75, 0.5, 0.25]
    # A = [0.25, -0.25, -0.25, 0.25] on every valid token
    expected = torch.tensor([[0.25, 0.25, 0], [-0.25, -0.25, -0.25], [-0.25, -0.25, 0], [0.25] * 3])
    torch.testing.assert_close(batch.advantages, expected)


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_group_baselines_need_groups(tmp_path: Path, name: str) -> None:
    ctx = _ctx(tmp_path, _cfg(name))
    assert ctx.needs.min_group_size == 2
    cfg = ctx.cfg.copy()
    cfg.rl.samples_per_prompt = 1
    pattern = rf"samples_per_prompt=1 with algorithm={name}: .*samples_per_prompt >= 2"
    with pytest.raises(ConfigError, match=pattern):
        check_algorithm_needs(cfg, ctx.needs)
    cfg.rl.samples_per_prompt = 2
    check_algorithm_needs(cfg, ctx.needs)


def test_reinforce_pp_advantage_is_whitened_return_to_go(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, _cfg("reinforce_pp"))
    batch = _advantage(ctx, _batch())
    # per-token rewards -0.5 * KL + score on the last valid token:
    #   row0 [-0.25, 0 + 1.0]   row1 [0.5, 0, 0 + 0]   row2 [0, -0.25 + 0.5]   row3 [0, 0, 0.5]
    # returns-to-go (gamma = 1):
    #   row0 [0.75, 1.0]        row1 [0.5, 0, 0]       row2 [0.25, 0.25]       row3 [0.5]*3
    # 10 valid values, sum 4.25, mean 0.425; squared deviations sum to 0.88125 -> var 0.88125/9
    returns = torch.tensor([[0.75, 1.0, 0], [0.5, 0, 0], [0.25, 0.25, 0], [0.5, 0.5, 0.5]])
    expected = (returns - 0.425) / math.sqrt(0.88125 / 9) * batch.response_mask
    torch.testing.assert_close(batch.advantages, expected)


class _FixedValues(nn.Module):
    """A stand-in critic with known outputs: (B, T) values, whatever the input."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("values", values)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.values + 0 * self.unused


def _ppo_ctx_with_fixed_values(tmp_path: Path, **algo: Any) -> RunContext:
    cfg = _cfg("ppo", {"lam": 0.5, "whiten_advantages": False, "minibatch_size": 4, **algo})
    ctx = _ctx(tmp_path, cfg)
    # V for response tokens sits at columns P-1 .. T-2 = 1 .. 3 (the state before each token).
    full = torch.zeros(4, 5)
    full[:, 1:4] = torch.tensor([[0.5, 1.0, 7.0], [0.0, 0.5, 0.5], [0.0, 0.0, 7.0], [1.0, 1, 1]])
    critic = _FixedValues(full)
    ctx.state[CRITIC_KEY] = Critic(
        "separate", critic, torch.optim.SGD(critic.parameters(), lr=0.0), 0.0
    )
    return ctx


def test_ppo_advantage_is_gae_of_kl_shaped_token_rewards(tmp_path: Path) -> None:
    ctx = _ppo_ctx_with_fixed_values(tmp_path)
    batch = _advantage(ctx, _batch())
    # token rewards as for REINFORCE++: row0 [-0.25, 1.0], row1 [0.5, 0, 0], row2 [0, 0.25],
    # row3 [0, 0, 0.5]. GAE with gamma = 1, lambda = 0.5, last token bootstrapping with 0:
    #   row0 V [0.5, 1.0]: d1 = 1 - 1 = 0, A1 = 0; d0 = -0.25 + 1 - 0.5 = 0.25, A0 = 0.25
    #   row1 V [0, .5, .5]: d2 = -0.5; d1 = 0.5 - 0.5 = 0, A1 = -0.25; d0 = 0.5 + 0.5 = 1,
    #        A0 = 1 - 0.125 = 0.875
    #   row2 V [0, 0]: d1 = 0.25, A1 = 0.25; d0 = 0, A0 = 0.125
    #   row3 V [1, 1, 1]: d2 = -0.5; d1 = 0, A1 = -0.25; d0 = 0, A0 = -0.125
    expected_adv = torch.tensor(
        [[0.25, 0.0, 0], [0.875, -0.25, -0.5], [0.125, 0.25, 0], [-0.125, -0.25, -0.5]]
    )
    torch.testing.assert_close(batch.advantages, expected_adv)
    # returns = A + V; the padded value 7.0 is dropped
    expected_ret = torch.tensor(
        [[0.75, 1.0, 0], [0.875, 0.25, 0.0], [0.125, 0.25, 0], [0.875, 0.75, 0.5]]
    )
    torch.testing.assert_close(batch.returns, expected_ret)
    torch.testing.assert_close(batch.values[0], torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(batch.kl.sum(1), torch.tensor([0.5, -1.0, 0.5, 0.0]))


def test_ppo_kl_in_loss_leaves_the_reward_unshaped(tmp_path: Path) -> None:
    ctx = _ppo_ctx_with_fixed_values(tmp_path, kl_in_loss=True)
    batch = _advantage(ctx, _batch())
    # row0 rewards [0, 1.0]: d1 = 0, d0 = 0 + 1 - 0.5 = 0.5 -> A0 = 0.5
    assert batch.advantages[0, 0].item() == pytest.approx(0.5)


def test_ppo_whitened_advantages_have_unit_statistics(tmp_path: Path) -> None:
    ctx = _ppo_ctx_with_fixed_values(tmp_path, whiten_advantages=True)
    batch = _advantage(ctx, _batch())
    valid = batch.advantages[batch.response_mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert batch.advantages[0, 2] == 0.0


# ---------------------------------------------------------------------------------------------
# updates on a tiny GPT-2
# ---------------------------------------------------------------------------------------------

CASES = [
    ("ppo", {"value_model": "separate"}),
    ("ppo", {"value_model": "shared"}),
    ("grpo", {}),
    ("rloo", {}),
    ("reinforce_pp", {}),
]
CASE_IDS = ["ppo-separate", "ppo-shared", "grpo", "rloo", "reinforce_pp"]


def _run_step(ctx: RunContext, name: str, batch: Rollout) -> dict[str, float]:
    ctx.plugins.call("run_start", ctx=ctx)
    return _update(ctx, _advantage(ctx, batch))


@pytest.mark.parametrize(("name", "algo"), CASES, ids=CASE_IDS)
def test_update_changes_weights_and_reports_metrics(
    tmp_path: Path, name: str, algo: dict[str, Any]
) -> None:
    policy = _policy()
    before = [p.detach().clone() for p in policy.parameters()]
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ctx = _ctx(tmp_path, _cfg(name, {"minibatch_size": 2, **algo}), policy=policy, optimizer=opt)
    metrics = _run_step(ctx, name, _on_policy_batch(policy))
    assert METRIC_KEYS[name] <= set(metrics), METRIC_KEYS[name] - set(metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert any(not torch.equal(b, p) for b, p in zip(before, policy.parameters(), strict=True))
    # log pi - log ref = 0.1 on each of the 10 tokens of 4 rows: k1 = 0.1 per token;
    # GRPO's k3 = e^-0.1 - 1 + 0.1 per token
    per_token = math.exp(-0.1) - 0.9 if name == "grpo" else 0.1
    assert metrics["kl/ref"] == pytest.approx(per_token * 10 / 4, rel=1e-4)
    if name == "ppo":
        critic = ctx.state[CRITIC_KEY]
        assert critic.kind == algo["value_model"]
        # the critic learned too (its optimizer stepped)
        assert critic.optimizer.state
        assert "value/grad_norm" in metrics or algo["value_model"] == "shared"


@pytest.mark.parametrize(("name", "algo"), CASES, ids=CASE_IDS)
def test_gradient_does_not_depend_on_minibatch_split(
    tmp_path: Path, name: str, algo: dict[str, Any]
) -> None:
    """(minibatch_size, grad_accum_steps) = (4, 1), (2, 2), (1, 4): one optimizer step on the
    same 4 rows, so the same gradient and the same loss."""
    results = []
    for size, accum in ((4, 1), (2, 2), (1, 4)):
        policy = _policy()
        # lr 0 keeps the weights, so the gradients of the one step can be compared.
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        overrides = {"minibatch_size": size, "grad_accum_steps": accum, "value_lr": 0.0, **algo}
        if name == "ppo":
            overrides["ppo_epochs"] = 1
        else:
            overrides["epochs"] = 1
        if name == "rloo":
            overrides["loss_agg"] = "seq_mean_token_sum_norm"  # the third aggregation mode
        known = {f.name for f in dataclasses.fields(PLUGINS[name][1])}
        cfg = _cfg(name, {k: v for k, v in overrides.items() if k in known})
        ctx = _ctx(tmp_path, cfg, policy=policy, optimizer=opt)
        metrics = _run_step(ctx, name, _on_policy_batch(policy))
        params = list(policy.parameters())
        if name == "ppo":
            params += list(ctx.state[CRITIC_KEY].module.parameters())
        grads = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        results.append((grads, metrics))
        # on-policy first pass: every ratio is 1, so nothing is clipped
        assert metrics["policy/clipfrac"] == 0.0
        assert metrics["kl/approx"] == pytest.approx(0.0, abs=1e-6)
    (g0, m0), *rest = results
    assert g0.abs().sum() > 0
    for grads, metrics in rest:
        torch.testing.assert_close(grads, g0, atol=1e-6, rtol=1e-5)
        assert metrics["loss/total"] == pytest.approx(m0["loss/total"], abs=1e-6)
        assert metrics["loss/policy"] == pytest.approx(m0["loss/policy"], abs=1e-6)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_ppo_critic_trained_on_its_rollout_forward_takes_the_same_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss_agg: str
) -> None:
    """With one optimizer step per batch, ``value_forward_once`` trains the separate critic in
    the advantage phase from its only forward: same weights after the step (policy and
    critic), advantages, returns and metrics as the two-forward path, one forward fewer."""
    forwards = {"n": 0}
    original = critic_module.critic_values

    def counted(*args: Any) -> torch.Tensor:
        forwards["n"] += 1
        return original(*args)

    monkeypatch.setattr(critic_module, "critic_values", counted)
    runs = []
    for once in (True, False):
        forwards["n"] = 0
        policy = _policy()
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-2, eps=1e-4)
        algo = {
            "value_model": "separate",
            "ppo_epochs": 1,
            "minibatch_size": 2,
            "grad_accum_steps": 2,
            "value_forward_once": once,
            "loss_agg": loss_agg,
            "whiten_rewards": True,
        }
        # Adam's eps above the rounding noise of the attention key biases' gradients (zero
        # in exact arithmetic), which a tiny eps would scale up to lr-sized steps.
        optim = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-4, "weight_decay": 0.0}
        cfg = _cfg("ppo", algo, optim={**optim, "max_grad_norm": 1e9})
        ctx = _ctx(tmp_path, cfg, policy=policy, optimizer=opt)
        ctx.plugins.call("run_start", ctx=ctx)
        batch = _advantage(ctx, _on_policy_batch(policy))
        # gradient accumulated in the advantage phase, stepped in the update phase
        assert (ctx.state[CRITIC_KEY].pending is not None) is once
        metrics = _update(ctx, batch)
        critic = ctx.state[CRITIC_KEY].module
        weights = [p.detach().clone() for p in [*policy.parameters(), *critic.parameters()]]
        runs.append((forwards["n"], batch, metrics, weights))
    (n_once, b_once, m_once, w_once), (n_two, b_two, m_two, w_two) = runs
    assert (n_once, n_two) == (2, 4)  # micro-batches of 2 rows: 2 forwards against 2 + 2
    torch.testing.assert_close(b_once.values, b_two.values, atol=1e-6, rtol=0)
    torch.testing.assert_close(b_once.returns, b_two.returns, atol=1e-6, rtol=0)
    torch.testing.assert_close(b_once.advantages, b_two.advantages, atol=1e-5, rtol=0)
    assert m_once.keys() == m_two.keys()
    for key in ("loss/total", "loss/value", "loss/policy", "value/grad_norm", "policy/grad_norm"):
        assert m_once[key] == pytest.approx(m_two[key], rel=1e-5, abs=1e-7), key
    assert m_once["loss/value"] > 0 and m_once["value/grad_norm"] > 0
    for a, b in zip(w_once, w_two, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ppo_critic_with_more_than_one_step_keeps_its_rollout_forward(tmp_path: Path) -> None:
    """Two epochs (or minibatches) change the critic between steps: V_old comes first."""
    policy = _policy()
    for algo in ({"ppo_epochs": 2}, {"ppo_epochs": 1, "minibatch_size": 2}):
        ctx = _ctx(tmp_path, _cfg("ppo", algo), policy=policy)
        ctx.plugins.call("run_start", ctx=ctx)
        _advantage(ctx, _on_policy_batch(policy))
        assert ctx.state[CRITIC_KEY].pending is None, algo


# ---------------------------------------------------------------------------------------------
# PPO checkpoints: the critic and the KL controller
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_ppo_checkpoint_restores_critic_and_kl_controller(tmp_path: Path, value_model: str) -> None:
    # A tiny target makes the adaptive controller move after one step.
    algo = {"value_model": value_model, "kl_ctl": "adaptive", "kl_target": 0.01, "kl_horizon": 8}
    cfg = _cfg("ppo", algo)
    policy = _policy()
    ctx = _ctx(
        tmp_path / "a",
        cfg,
        policy=policy,
        optimizer=torch.optim.AdamW(policy.parameters(), lr=1e-2),
    )
    _run_step(ctx, "ppo", _on_policy_batch(policy))
    # KL 0.25 per sequence >> target: error clipped to 0.2 -> beta = 0.5 * (1 + 0.2 * 4/8) = 0.55
    assert ppo.kl_controller(ctx).coef == pytest.approx(0.55)
    path = save_checkpoint(ctx, 1, {"sampler": {}})
    assert (path / CRITIC_DIR / "model.safetensors").is_file()

    fresh = _policy(seed=1)
    ctx2 = _ctx(
        tmp_path / "b",
        cfg,
        policy=fresh,
        optimizer=torch.optim.AdamW(fresh.parameters(), lr=1e-2),
    )
    load_checkpoint(ctx2, path)
    ctx2.plugins.call("run_start", ctx=ctx2)
    assert ppo.kl_controller(ctx2).coef == pytest.approx(0.55)
    saved, loaded = ctx.state[CRITIC_KEY], ctx2.state[CRITIC_KEY]
    for a, b in zip(saved.module.parameters(), loaded.module.parameters(), strict=True):
        assert torch.equal(a, b)
    first = next(iter(saved.optimizer.state.values()))
    first_loaded = next(iter(loaded.optimizer.state.values()))
    assert torch.equal(first["exp_avg"], first_loaded["exp_avg"])
    for a, b in zip(policy.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_critic_checkpointed_by_an_earlier_version_is_restored(tmp_path: Path) -> None:
    """Checkpoints of earlier versions hold PPO's critic in ``ppo_value/``."""
    cfg = _cfg("ppo", {"value_model": "separate"})
    policy = _policy()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    ctx = _ctx(tmp_path / "a", cfg, policy=policy, optimizer=optimizer)
    _run_step(ctx, "ppo", _on_policy_batch(policy))
    path = save_checkpoint(ctx, 1, {"sampler": {}})
    (path / CRITIC_DIR).rename(path / "ppo_value")
    fresh = _policy(seed=1)
    ctx2 = _ctx(tmp_path / "b", cfg, policy=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
    load_checkpoint(ctx2, path)
    saved, loaded = ctx.state[CRITIC_KEY].module, ctx2.state[CRITIC_KEY].module
    for a, b in zip(saved.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


def test_ppo_separate_critic_starts_from_a_reward_model_folder(tmp_path: Path) -> None:
    reward_model = ScalarHeadModel(_policy(seed=3))
    with torch.no_grad():
        reward_model.head.weight.fill_(0.25)
        reward_model.head.bias.fill_(-1.0)
    reward_model.save_pretrained(tmp_path / "rm")
    cfg = _cfg("ppo", {"value_model": "separate", "value_model_path": str(tmp_path / "rm")})
    policy = _policy()
    ctx = _ctx(tmp_path, cfg, policy=policy, optimizer=torch.optim.SGD(policy.parameters()))
    ctx.plugins.call("run_start", ctx=ctx)
    critic = ctx.state[CRITIC_KEY].module
    assert torch.equal(critic.head.weight, torch.full((1, 16), 0.25))
    assert critic.head.bias.item() == -1.0
    wte = critic.backbone.wte.weight
    assert torch.equal(wte, reward_model.backbone.wte.weight)
    assert not torch.equal(wte, policy.transformer.wte.weight)


def test_ppo_default_critic_copies_the_policy_weights(tmp_path: Path) -> None:
    policy = _policy()
    ctx = _ctx(tmp_path, _cfg("ppo"), policy=policy, optimizer=torch.optim.SGD(policy.parameters()))
    ctx.plugins.call("run_start", ctx=ctx)
    critic = ctx.state[CRITIC_KEY].module
    assert torch.equal(
        critic.backbone.h[0].attn.c_attn.weight, policy.transformer.h[0].attn.c_attn.weight
    )
    # a copy, not the same tensors: training the critic must not move the policy
    assert critic.backbone.wte.weight.data_ptr() != policy.transformer.wte.weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def test_lora_reference_is_the_base_model_and_training_touches_only_adapters(
    tmp_path: Path,
) -> None:
    pytest.importorskip("peft")
    from alignkit.models.lora import AdapterDisabledReference, apply_lora, lora_parameters

    base = _policy()
    base_copy = copy.deepcopy(base)
    policy = apply_lora(base, r=4, alpha=8, target_modules=["c_attn"])
    with torch.no_grad():  # move B away from its zero init so the adapters change the output
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    ref = AdapterDisabledReference(policy)
    assert list(ref.parameters()) == []
    ids, mask = _batch().sequences()
    ref_logp = sequence_logprobs(ref, ids, mask, 2)
    torch.testing.assert_close(ref_logp, sequence_logprobs(base_copy, ids, mask, 2))
    assert not torch.allclose(sequence_logprobs(policy, ids, mask, 2), ref_logp)
    assert not ref_logp.requires_grad

    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.AdamW(lora_parameters(policy), lr=1e-2)
    ctx = _ctx(tmp_path, _cfg("grpo"), policy=policy, optimizer=opt, ref_policy=ref)
    batch = _on_policy_batch(policy)
    with torch.no_grad():
        batch.ref_logprobs = sequence_logprobs(ref, ids, mask, 2) * batch.response_mask
    _run_step(ctx, "grpo", batch)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    assert all("lora_" in n for n in changed), changed


def test_lora_without_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from alignkit.models.lora import apply_lora

    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    with pytest.raises(ConfigError, match=r"alignkit\[lora\]"):
        apply_lora(_policy())


# ---------------------------------------------------------------------------------------------
# one CLI run per algorithm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PLUGINS))
def test_cli_smoke_run(sft_run: Path, tmp_path: Path, name: str) -> None:
    args = [
        "stage=rl",
        f"algorithm={name}",
        *SMOKE,
        "reward=[gold]",
        f"model.path={sft_run / 'sft'}",
    ]
    proc = run_cli([*args, f"run_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        missing = METRIC_KEYS[name] - set(row)
        assert not missing, missing
        assert isinstance(row["reward/gold"], float)
    if name == "ppo":
        assert (tmp_path / "rl" / "checkpoints" / "step_000003" / CRITIC_DIR).is_dir()
