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
from alignkit.context import RunContext
from alignkit.engine import PromptSampler
from alignkit.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from alignkit.errors import ConfigError, PluginError
from alignkit.plugins import PluginManager
from alignkit.registry import ComponentRegistry
from alignkit.rewards.combine import combine_rewards
from alignkit.tracking import Tracker


def _ctx(tmp_path: Path, reward: dict | None = None, **kw) -> RunContext:
    cfg = OmegaConf.create({"reward": reward or {}, "rl": {"keep_checkpoints": 2}})
    pm = kw.pop("plugins", None) or PluginManager(installed={})
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
        [{"gold": torch.tensor([1.0, 0.0, 0.5])}, {"len/tokens": torch.tensor([2.0, 4.0, 0.0])}],
        ctx.reward_weight,
        rows=3,
    )
    # 2*[1, 0, .5] - .5*[2, 4, 0] = [1, -2, 1]
    assert torch.allclose(total, torch.tensor([1.0, -2.0, 1.0]))
    assert set(comps) == {"gold", "len/tokens"}
    assert torch.equal(comps["len/tokens"], torch.tensor([2.0, 4.0, 0.0]))


def test_reward_without_weight_names_the_key(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 1.0}})
    with pytest.raises(ConfigError, match=r"reward\.critique\.weight"):
        combine_rewards([{"critique": torch.ones(2)}], ctx.reward_weight, rows=2)


def test_reward_shape_and_duplicates_are_errors(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 1.0}})
    with pytest.raises(PluginError, match="shape"):
        combine_rewards([{"gold": torch.ones(3)}], ctx.reward_weight, rows=2)
    with pytest.raises(PluginError, match="two reward plugins"):
        combine_rewards(
            [{"gold": torch.ones(2)}, {"gold": torch.ones(2)}], ctx.reward_weight, rows=2
        )
    with pytest.raises(PluginError, match="no reward plugin"):
        combine_rewards([], ctx.reward_weight, rows=2)


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
    from alignkit.engine.checkpoint import save_checkpoint
    from alignkit.context import RunContext
    from alignkit.plugins import PluginManager
    from alignkit.registry import ComponentRegistry
    from alignkit.tracking import Tracker
    import alignkit.engine.checkpoint as ck

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
    results = [out, {"gold": torch.tensor([1.0, 1.0, 0.0, 0.5])}]
    total, _ = combine_rewards(results, ctx.reward_weight, rows=4)
    assert torch.allclose(total, torch.tensor([1.0, -1.0, 0.0, -1.5]))
    batch.finished = None
    with pytest.raises(ValueError, match="finished"):
        eos_penalty.reward(ctx=_ctx(tmp_path), batch=batch)


# --------------------------------------------------------------------------------------------
# the plugin API on the batch and the context
# --------------------------------------------------------------------------------------------


def test_select_keeps_every_per_row_value_aligned_and_renumbers_groups() -> None:
    batch = _rollout(b=6, r=3)  # groups [0, 0, 1, 1, 2, 2]
    batch.rewards = torch.arange(6.0)
    batch.kl = torch.arange(18.0).view(6, 3)
    batch.responses = [f"r{i}" for i in range(6)]
    batch.reward_components = {"gold": torch.arange(6.0) * 10}
    batch.extras = {"row": torch.arange(6.0) + 100, "note": "kept", "matrix": torch.ones(2, 2)}
    keep = torch.tensor([False, False, True, True, True, True])
    out = batch.select(keep)
    assert out.num_rows == 4 and out.group_ids.tolist() == [0, 0, 1, 1]
    assert out.rewards.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert out.kl[0].tolist() == [6.0, 7.0, 8.0]
    assert out.responses == ["r2", "r3", "r4", "r5"]
    assert out.reward_components["gold"].tolist() == [20.0, 30.0, 40.0, 50.0]
    assert out.extras["row"].tolist() == [102.0, 103.0, 104.0, 105.0]
    assert out.extras["note"] == "kept" and out.extras["matrix"].shape == (2, 2)
    assert batch.num_rows == 6  # the original is untouched
    out.validate()
    assert batch.select(torch.tensor([5, 4])).group_ids.tolist() == [0, 0]


def test_cat_pads_to_the_widest_and_keeps_groups_apart() -> None:
    a, b = _rollout(b=2, r=2), _rollout(b=2, r=4)
    for part, value in ((a, 1.0), (b, 2.0)):
        part.rewards = torch.full((2,), value)
        part.extras["row"] = torch.full((2,), value)
        part.extras["tok"] = torch.full((2, part.response_ids.shape[1]), value)
    b.prompt_ids, b.prompt_mask = (
        torch.ones(2, 3, dtype=torch.long),
        torch.ones(2, 3, dtype=torch.long),
    )
    out = Rollout.cat([a, b], pad_token_id=9)
    assert out.response_ids.shape == (4, 4) and out.prompt_ids.shape == (4, 3)
    assert out.prompt_ids[0].tolist() == [9, 0, 0]  # left-padded with the pad id
    assert out.response_mask[0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.group_ids.tolist() == [0, 0, 1, 1]
    assert out.rewards.tolist() == [1.0, 1.0, 2.0, 2.0]
    assert out.extras["tok"][0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.extras["row"].tolist() == [1.0, 1.0, 2.0, 2.0]
    out.validate()
    empty = a.select(torch.zeros(2, dtype=torch.bool))
    assert Rollout.cat([empty, b]).group_ids.tolist() == [0, 0]


def test_draw_prompts_advances_the_run_sampler_by_this_ranks_share(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(ConfigError, match="only inside an RL run"):
        ctx.draw_prompts(2)
    ctx.prompt_sampler = PromptSampler(list(range(10)), seed=1)
    reference = PromptSampler(list(range(10)), seed=1)
    assert ctx.draw_prompts(4) == reference.next(4)
    assert ctx.prompt_sampler.state() == reference.state()  # checkpointed with the run
    assert ctx.sum_over_ranks(2.5) == 2.5  # one process


def test_a_declared_reward_weight_applies_unless_the_config_sets_one(tmp_path: Path) -> None:
    from alignkit_plugins import core

    from alignkit import AlgorithmNeeds, hookimpl
    from alignkit.plugins import PluginInfo

    class Algo:
        @hookimpl
        def algorithm_needs(self, cfg: object) -> AlgorithmNeeds:
            return AlgorithmNeeds(reward_weights={"shaping": 0.5})

    installed = {
        "core": PluginInfo(name="core", source="local", target="core", obj=core),
        "algo": PluginInfo(name="algo", source="local", target="algo", obj=Algo()),
    }
    pm = PluginManager(installed=installed)
    pm.activate(["algo"])
    ctx = _ctx(tmp_path, reward={"gold": {"weight": 2.0}}, plugins=pm)
    assert ctx.reward_weight("shaping") == 0.5
    assert ctx.reward_weight("shaping/len") == 0.5
    assert ctx.reward_weight("gold") == 2.0
    ctx.cfg.reward.shaping = {"weight": -1.0}
    assert ctx.reward_weight("shaping") == -1.0
    with pytest.raises(ConfigError, match=r"reward\.other\.weight"):
        ctx.reward_weight("other")


def test_cat_refuses_a_per_row_extra_missing_from_a_part() -> None:
    a, b = _rollout(b=2), _rollout(b=2)
    a.extras["baseline"] = torch.zeros(2)
    with pytest.raises(ValueError, match="per-row extra 'baseline' is missing"):
        Rollout.cat([a, b])


def test_two_plugins_may_not_both_declare_the_runs_needs(tmp_path: Path) -> None:
    from alignkit_plugins import core

    from alignkit import AlgorithmNeeds, hookimpl
    from alignkit.plugins import PluginInfo

    class Declares:
        @hookimpl
        def algorithm_needs(self, cfg: object) -> AlgorithmNeeds:
            return AlgorithmNeeds()

    installed = {
        "core": PluginInfo(name="core", source="local", target="core", obj=core),
        "algo": PluginInfo(name="algo", source="local", target="algo", obj=Declares()),
        "other": PluginInfo(name="other", source="local", target="other", obj=Declares()),
    }
    with pytest.raises(PluginError, match="plugins algo, other all answer 'algorithm_needs'"):
        PluginManager(installed=installed).activate(["algo", "other"])


def test_the_lazy_engine_package_names_only_its_own() -> None:
    import alignkit.engine as engine

    assert engine.Engine is engine.loop.Engine
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = engine.nothing_here
