"""The engine's pieces: reward combination, batch validation, prompt order, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.batch import Rollout
from alignkit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.context import RunContext
from alignkit.engine import PromptSampler, combine_rewards
from alignkit.errors import ConfigError, PluginError
from alignkit.plugins import PluginManager
from alignkit.registry import ComponentRegistry
from alignkit.tracking import Tracker


def _ctx(tmp_path: Path, reward: dict | None = None, **kw) -> RunContext:
    cfg = OmegaConf.create({"reward": reward or {}, "rl": {"keep_checkpoints": 2}})
    pm = PluginManager(installed={})
    return RunContext(
        cfg=cfg,
        run_dir=tmp_path,
        plugins=pm,
        registry=ComponentRegistry(),
        tracker=Tracker(tmp_path, enabled=False),
        **kw,
    )


def _rollout(b: int = 4, r: int = 3) -> Rollout:
    return Rollout(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.zeros(b, r, dtype=torch.long),
        response_mask=torch.ones(b, r),
        group_ids=torch.arange(b // 2).repeat_interleave(2),
    )


def test_rewards_are_combined_with_configured_weights(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 2.0}, "len": {"weight": -0.5}})
    total, comps = combine_rewards(
        ctx,
        [{"gold": torch.tensor([1.0, 0.0, 0.5])}, {"len/tokens": torch.tensor([2.0, 4.0, 0.0])}],
        rows=3,
    )
    # 2*[1, 0, .5] - .5*[2, 4, 0] = [1, -2, 1]
    assert torch.allclose(total, torch.tensor([1.0, -2.0, 1.0]))
    assert set(comps) == {"gold", "len/tokens"}
    assert torch.equal(comps["len/tokens"], torch.tensor([2.0, 4.0, 0.0]))


def test_reward_without_weight_names_the_key(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 1.0}})
    with pytest.raises(ConfigError, match=r"reward\.critique\.weight"):
        combine_rewards(ctx, [{"critique": torch.ones(2)}], rows=2)


def test_reward_shape_and_duplicates_are_errors(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 1.0}})
    with pytest.raises(PluginError, match="shape"):
        combine_rewards(ctx, [{"gold": torch.ones(3)}], rows=2)
    with pytest.raises(PluginError, match="two reward plugins"):
        combine_rewards(ctx, [{"gold": torch.ones(2)}, {"gold": torch.ones(2)}], rows=2)
    with pytest.raises(PluginError, match="no reward plugin"):
        combine_rewards(ctx, [], rows=2)


def test_rollout_validate_names_the_bad_field() -> None:
    batch = _rollout()
    batch.validate()
    assert batch.group_size == 2
    batch.logprobs = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"Rollout\.logprobs has shape \(4, 5\)"):
        batch.validate()
    batch.logprobs = None
    batch.responses = ["a"]
    with pytest.raises(ValueError, match="responses has 1 entries"):
        batch.validate()


def test_sequences_concatenate_prompt_and_response() -> None:
    batch = _rollout(b=2, r=2)
    batch.response_mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    ids, mask = batch.sequences()
    assert ids.shape == (2, 4)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_prompt_sampler_is_deterministic_and_restorable() -> None:
    a, b = PromptSampler(list(range(10)), seed=3), PromptSampler(list(range(10)), seed=3)
    first = a.next(7)
    assert first == b.next(7)
    assert sorted(first + a.next(3)) == list(range(10))  # one full pass before repeating
    state = a.state()
    ahead = a.next(12)
    c = PromptSampler(list(range(10)), seed=3)
    c.restore(state)
    assert c.next(12) == ahead
    assert PromptSampler(list(range(10)), seed=4).next(10) != PromptSampler(
        list(range(10)), seed=3
    ).next(10)


def _tiny_policy() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50,
            n_embd=16,
            n_layer=1,
            n_head=2,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def test_checkpoint_roundtrip_restores_weights_optimizer_rng_and_state(tmp_path: Path) -> None:
    policy = _tiny_policy()
    opt = torch.optim.AdamW(policy.parameters(), lr=0.1)
    policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    ctx = _ctx(tmp_path, policy=policy, optimizer=opt, generator=gen)
    ctx.state.update({"kl_coef": 0.2, "running": torch.tensor([1.5, 2.5]), "skip": object()})
    path = save_checkpoint(ctx, 7, {"sampler": {"epoch": 1, "index": 3}})
    assert latest_checkpoint(tmp_path) == path
    expected_sample = torch.rand(3, generator=gen)

    fresh = _tiny_policy()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ctx2 = _ctx(tmp_path, policy=fresh, optimizer=opt2, generator=torch.Generator())
    meta = load_checkpoint(ctx2, path)
    assert meta["step"] == 7 and meta["sampler"] == {"epoch": 1, "index": 3}
    for p, q in zip(policy.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(torch.rand(3, generator=ctx2.generator), expected_sample)
    assert ctx2.state["kl_coef"] == 0.2 and torch.equal(
        ctx2.state["running"], torch.tensor([1.5, 2.5])
    )


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    policy = _tiny_policy()
    ctx = _ctx(tmp_path, policy=policy)
    for step in (1, 2, 3):
        save_checkpoint(ctx, step, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_000002", "step_000003"]


CRASHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from omegaconf import OmegaConf
    from transformers import GPT2Config, GPT2LMHeadModel
    from alignkit.checkpoint import save_checkpoint
    from alignkit.context import RunContext
    from alignkit.plugins import PluginManager
    from alignkit.registry import ComponentRegistry
    from alignkit.tracking import Tracker
    import alignkit.checkpoint as ck

    run = Path(sys.argv[1])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    policy = GPT2LMHeadModel(config)
    ctx = RunContext(cfg=OmegaConf.create({"rl": {"keep_checkpoints": 2}}), run_dir=run,
                     plugins=PluginManager(installed={}), registry=ComponentRegistry(),
                     tracker=Tracker(run, enabled=False), policy=policy)
    save_checkpoint(ctx, 1, {})
    real_save = ck.torch.save
    def slow_save(obj, f):
        real_save(obj, f)
        print("WRITING", flush=True)
        time.sleep(60)  # killed here, in the middle of writing step 2
    ck.torch.save = slow_save
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    save_checkpoint(ctx, 2, {})
    """
)


def test_sigkill_during_checkpoint_write_keeps_last_good_one(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(CRASHER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "WRITING"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step_000001"
    # The surviving checkpoint is complete and loads into a fresh model.
    policy = _tiny_policy()
    ctx = _ctx(tmp_path / "run", policy=policy)
    ctx.cfg = OmegaConf.create({"rl": {"keep_checkpoints": 2}})
    assert load_checkpoint(ctx, latest)["step"] == 1
    assert not (tmp_path / "run" / "checkpoints" / "step_000002").exists()


def test_eos_penalty_component_marks_truncated_responses(tmp_path: Path) -> None:
    from alignkit_plugins import eos_penalty

    batch = _rollout(b=4)
    batch.finished = torch.tensor([True, False, True, False])
    out = eos_penalty.reward(ctx=_ctx(tmp_path), batch=batch)
    assert torch.equal(out["eos_penalty"], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 1.0}, "eos_penalty": {"weight": -2.0}})
    total, _ = combine_rewards(ctx, [out, {"gold": torch.tensor([1.0, 1.0, 0.0, 0.5])}], rows=4)
    assert torch.allclose(total, torch.tensor([1.0, -1.0, 0.0, -1.5]))
    batch.finished = None
    with pytest.raises(ValueError, match="finished"):
        eos_penalty.reward(ctx=_ctx(tmp_path), batch=batch)
