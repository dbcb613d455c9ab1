"""REINFORCE plugin: hand-computed advantages and accumulation-invariant updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from alignkit_plugins import reinforce
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.plugins import PluginManager
from alignkit.registry import ComponentRegistry
from alignkit.tracking import Tracker


def _ctx(tmp_path: Path, *, kl_coef: float, whiten: bool, minibatch: int = 64, **kw) -> RunContext:
    cfg = OmegaConf.create(
        {
            "rl": {"kl_coef": kl_coef, "temperature": 1.0, "optim": {"max_grad_norm": 1e9}},
            "algorithm": {"name": "reinforce", "whiten": whiten, "minibatch_size": minibatch},
        }
    )
    return RunContext(
        cfg=cfg,
        run_dir=tmp_path,
        plugins=PluginManager(installed={}),
        registry=ComponentRegistry(),
        tracker=Tracker(tmp_path, enabled=False),
        **kw,
    )


def _batch() -> Rollout:
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


def test_advantage_without_whitening_is_kl_shaped_score_minus_batch_mean(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, kl_coef=0.5, whiten=False)
    batch = _batch()
    # The rollout's per-token KL (k1 by default: the KL is in the reward).
    assert ctx.kl_estimator == "k1"
    batch.kl = (batch.logprobs - batch.ref_logprobs) * batch.response_mask
    batch = reinforce.advantage(ctx, batch)
    # k1 KL per sequence: [0.5, -1.0, 0.5, 0.0]; scores r - 0.5*KL = [0.75, 0.5, 0.25, 0.5]
    # batch mean 0.5 -> advantages [0.25, 0.0, -0.25, 0.0] on every valid token.
    assert torch.allclose(batch.kl.sum(1), torch.tensor([0.5, -1.0, 0.5, 0.0]))
    expected = torch.tensor([[0.25, 0.25, 0], [0.0, 0, 0], [-0.25, -0.25, 0], [0, 0, 0]])
    assert torch.allclose(batch.advantages, expected)


def test_advantage_whitened_and_without_kl(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, kl_coef=0.0, whiten=True)
    batch = reinforce.advantage(ctx, _batch())
    # rewards [1, 0, .5, .5]: mean .5, unbiased std sqrt(0.5/3)
    std = (0.5 / 3) ** 0.5
    assert torch.allclose(batch.advantages[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]) / std)
    assert batch.advantages[0, 2] == 0.0  # masked


def _policy() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=12, n_embd=16, n_layer=1, n_head=2, n_positions=8, bos_token_id=0, eos_token_id=1
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("minibatch", [1, 3])
def test_update_gradient_does_not_depend_on_minibatch_size(tmp_path: Path, minibatch: int) -> None:
    grads = {}
    for size in (4, minibatch):
        policy = _policy()
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)  # keep weights: compare gradients
        ctx = _ctx(
            tmp_path, kl_coef=0.0, whiten=False, minibatch=size, policy=policy, optimizer=opt
        )
        batch = reinforce.advantage(ctx, _batch())
        reinforce.update(ctx, batch)
        grads[size] = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert torch.allclose(grads[4], grads[minibatch], atol=1e-6)


def test_update_loss_matches_hand_computation(tmp_path: Path) -> None:
    policy = _policy()
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    ctx = _ctx(tmp_path, kl_coef=0.0, whiten=False, policy=policy, optimizer=opt)
    batch = reinforce.advantage(ctx, _batch())
    metrics = reinforce.update(ctx, batch)
    from alignkit.models import sequence_logprobs

    ids, mask = batch.sequences()
    logp = sequence_logprobs(policy, ids, mask, 2)
    expected = -(batch.advantages * logp * batch.response_mask).sum() / batch.response_mask.sum()
    assert metrics["loss/policy"] == pytest.approx(expected.item(), abs=1e-6)
