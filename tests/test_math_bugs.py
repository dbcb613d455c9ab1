"""RL settings whose maths silently trains the wrong thing, each refused or made right.

1. A k1 KL term in the loss has zero expected gradient: refused at config time.
2. Dropout in the policy (LoRA's included) moves the first-minibatch ratio away from 1: off.
3. A response cut at ``rl.max_new_tokens`` reaches the reward model without its EOS.
4. Top-k / top-p rollouts with full-distribution old log-probs: refused unless allowed.
5. GRPO with one sample per prompt (every advantage 0): refused at config time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from alignkit_plugins import bradley_terry, rm_ensemble
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import AutoTokenizer

from alignkit import Rollout, RunContext
from alignkit.errors import ConfigError
from alignkit.models import ScalarHeadModel, TinyModelSpec, build_tiny_model
from alignkit.models.generation import tokenize_prompts
from alignkit.plugins import PluginManager
from alignkit.rewards.learned import encode_parts
from alignkit.rl.ops import kl_penalty
from alignkit.validate import check_algorithm_needs, check_config_ranges

PROMPTS = ["User: Q1: describe it.\nAssistant:", "User: Q7: describe it.\nAssistant:"]
CORPUS = [f"{p} red great awful cat dog sun tree box" for p in PROMPTS] * 3


@pytest.fixture(scope="module")
def compose() -> Iterator[Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from alignkit.cli import registration

    registration()
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        yield lambda overrides: hydra_compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 folder (with dropout in its config, as GPT-2 has)."""
    spec = TinyModelSpec(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=48, seed=0)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_lm") / "m", CORPUS, spec)


def _ctx(cfg: DictConfig, run_dir: Path) -> RunContext:
    """A context with a config and a run folder, no active plugin (the default needs), and
    no registry or tracker."""
    plugins = PluginManager(installed={})
    return RunContext(cfg=cfg, run_dir=run_dir, plugins=plugins, registry=None, tracker=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# 1. KL in the loss: k1's expected gradient is zero
# --------------------------------------------------------------------------------------------


def _expected_gradient(logits: nn.Parameter, ref_logp: torch.Tensor, estimator: str) -> Any:
    """d/d logits of E_{y ~ pi}[k(y)] as a loss term computes it: the sample weights pi(y)
    are not differentiated (the tokens were sampled), only the estimator's log pi(y)."""
    logp = torch.log_softmax(logits, dim=-1)
    per_token = kl_penalty(logp, ref_logp, estimator)  # (3,): k at each possible token
    weights = logp.detach().exp()
    (grad,) = torch.autograd.grad((weights * per_token).sum(), logits)
    return grad


def test_k2_in_the_loss_has_the_kl_gradient_and_k1_has_none() -> None:
    logits = nn.Parameter(torch.tensor([0.5, -0.3, 1.2], dtype=torch.float64))
    ref_logp = torch.log_softmax(torch.tensor([0.1, 0.4, -0.2], dtype=torch.float64), dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    exact_kl = (logp.exp() * (logp - ref_logp)).sum()
    (kl_grad,) = torch.autograd.grad(exact_kl, logits)
    assert kl_grad.abs().max() > 0.1  # the policy is far from the reference

    # k1 = log pi - log ref: sum_y pi(y) grad log pi(y) = grad sum_y pi(y) = 0.
    torch.testing.assert_close(_expected_gradient(logits, ref_logp, "k1"), torch.zeros(3).double())
    # k2 = (log pi - log ref)^2 / 2: sum_y pi(y) (log pi - log ref) grad log pi = grad KL.
    torch.testing.assert_close(_expected_gradient(logits, ref_logp, "k2"), kl_grad)
    # k3 still pulls towards the reference (its gradient is that of KL(ref || pi)).
    k3 = _expected_gradient(logits, ref_logp, "k3")
    ref = ref_logp.exp()
    reverse_kl = (ref * (ref_logp - torch.log_softmax(logits, dim=-1))).sum()
    (reverse_grad,) = torch.autograd.grad(reverse_kl, logits)
    torch.testing.assert_close(k3, reverse_grad)


def _check(cfg: DictConfig) -> None:
    """The config checks the CLI runs before any model loads: ranges and settings, then what
    the active algorithm declared it needs."""
    check_config_ranges(cfg)
    manager = PluginManager()
    manager.activate([str(cfg.algorithm.name)])
    check_algorithm_needs(cfg, manager.call("algorithm_needs", cfg=cfg))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm=ppo", "algorithm.kl_in_loss=true", "rl.kl_estimator=k1"],
            r"^rl\.kl_estimator=k1 with algorithm=ppo, which keeps its KL in the loss .*"
            r"zero expected gradient.*use rl\.kl_estimator=k2 .*or k3.*kl_in_loss=false",
        ),
        (
            ["algorithm=grpo", "rl.kl_estimator=k1"],
            r"^rl\.kl_estimator=k1 with algorithm=grpo, which keeps its KL in the loss .*"
            r"zero expected gradient.*use rl\.kl_estimator=k2 .*or k3.*rl\.kl_coef=0",
        ),
    ],
)
def test_k1_in_the_loss_is_refused(compose: Any, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _check(compose(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm=ppo"],  # k1 in the reward: the right estimator there
        ["algorithm=ppo", "rl.kl_estimator=k1"],
        ["algorithm=ppo", "algorithm.kl_in_loss=true"],  # unset: k3 in the loss
        ["algorithm=ppo", "algorithm.kl_in_loss=true", "rl.kl_estimator=k2"],
        ["algorithm=ppo", "algorithm.kl_in_loss=true", "rl.kl_estimator=k3"],
        ["algorithm=grpo"],  # k3, the paper's
        ["algorithm=grpo", "rl.kl_estimator=k1", "rl.kl_coef=0"],  # no KL term at all
        ["algorithm=rloo"],
        ["algorithm=reinforce_pp"],
    ],
)
def test_kl_estimators_that_penalise_pass(compose: Any, overrides: list[str]) -> None:
    _check(compose(overrides))


@pytest.mark.parametrize(
    ("overrides", "estimator"),
    [
        (["algorithm=ppo"], "k1"),
        (["algorithm=ppo", "algorithm.kl_in_loss=true"], "k3"),
        (["algorithm=grpo"], "k3"),
        (["algorithm=rloo"], "k1"),
        (["algorithm=grpo", "rl.kl_estimator=k2"], "k2"),
    ],
)
def test_one_kl_estimator_resolved_from_where_the_kl_enters(
    compose: Any, overrides: list[str], estimator: str
) -> None:
    cfg = compose(overrides)
    manager = PluginManager()
    manager.activate([str(cfg.algorithm.name)])
    ctx = RunContext(cfg=cfg, run_dir=Path("."), plugins=manager, registry=None, tracker=None)  # type: ignore[arg-type]
    assert ctx.kl_estimator == estimator


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm=grpo", "algorithm.policy_loss=nope"],
            r"^algorithm\.policy_loss=nope: no policy_loss of that name is registered; "
            r"registered: .*ppo_clip",
        ),
        (
            ["algorithm=grpo", "algorithm.advantage_estimator=nope"],
            r"^algorithm\.advantage_estimator=nope: .*registered: .*grpo.*rloo",
        ),
        (
            ["algorithm=grpo", "algorithm.advantage_estimator=null"],
            r"^algorithm=grpo sets no advantages: .*algorithm\.advantage_estimator is not set",
        ),
    ],
)
def test_unknown_or_missing_components_fail_before_any_model(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    from tests.conftest import run_cli

    proc = run_cli(["stage=rl", *overrides, "model.path=/nonexistent", f"run_dir={tmp_path}"])
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if line.startswith("alignkit: error:")]
    assert error and re.match(message, error[0].removeprefix("alignkit: error: ")), proc.stderr


def test_a_plugin_that_puts_k1_in_its_loss_is_refused_too() -> None:
    """A plugin building its own loss spec (no config check sees it) cannot use k1 either."""
    from alignkit.errors import ConfigError
    from alignkit.rl.update import PolicyLossSpec

    with pytest.raises(ConfigError, match="k1 KL estimator has zero expected gradient"):
        PolicyLossSpec(kl_coef=0.1, kl_estimator="k1")
    PolicyLossSpec(kl_coef=0.0, kl_estimator="k1")  # no KL in the loss: nothing to refuse
    PolicyLossSpec(kl_coef=0.1, kl_estimator="k2")


# --------------------------------------------------------------------------------------------
# 2. dropout off in the RL policy, LoRA's included
# --------------------------------------------------------------------------------------------


def _rl_setup_cfg(dropout: float) -> DictConfig:
    optim = {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
    lora = {"r": 4, "alpha": 8.0, "dropout": dropout, "target_modules": ["c_attn", "c_fc"]}
    model = {"dtype": "float32", "trust_remote_code": False, "revision": None, "lora": lora}
    return OmegaConf.create(
        {"model": model, "rl": {"kl_coef": 0.2, "steps": 2, "optim": optim}, "seed": 0}
    )


def test_rl_setup_turns_lora_dropout_off(
    tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("peft", reason="LoRA needs the optional 'lora' extra (peft)")
    from alignkit.stages.rl import setup_rl

    ctx = _ctx(_rl_setup_cfg(0.1), tmp_path)
    policy = setup_rl(ctx, tiny_lm).policy
    assert policy is not None
    lora_dropouts = [m for n, m in policy.named_modules() if "lora_dropout." in n]
    assert lora_dropouts and all(isinstance(m, nn.Dropout) for m in lora_dropouts)
    rates = {n: m.p for n, m in policy.named_modules() if isinstance(m, nn.Dropout)}
    assert rates and set(rates.values()) == {0.0}, rates
    assert "model.lora.dropout=0.1" in capsys.readouterr().err

    # With trained (non-zero) adapters, two train-mode forwards give the same log-probs.
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    policy.train()
    ids = torch.tensor([[5, 9, 14, 20, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(policy(ids).logits, policy(ids).logits, rtol=0, atol=0)


def test_rl_setup_without_dropout_says_nothing(
    tiny_lm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("peft", reason="LoRA needs the optional 'lora' extra (peft)")
    from alignkit.stages.rl import setup_rl

    ctx = _ctx(_rl_setup_cfg(0.0), tmp_path)
    setup_rl(ctx, tiny_lm)
    assert "dropout" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 3. a truncated response reaches the reward model unterminated
# --------------------------------------------------------------------------------------------


def test_reward_model_input_ends_with_eos_only_for_finished_rows(tiny_lm: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    eos = tok.eos_token_id
    responses = ["red great", "awful cat dog"]
    plain = encode_parts(tok, PROMPTS, responses, 48, finished=[True, False])
    assert plain[0][1][-1] == eos
    assert eos not in plain[1][1]
    assert plain[1][1] == tok(" awful cat dog", add_special_tokens=False)["input_ids"]
    # No flags: every response ended (the reward model's training data).
    assert all(r[-1] == eos for _, r in encode_parts(tok, PROMPTS, responses, 48))

    # A chat template closes the turn with its stop token: only a finished reply gets it.
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    convs = [[{"role": "user", "content": "Q1: describe it."}]] * 2
    chat = encode_parts(tok, PROMPTS, ["red great"] * 2, 48, convs, "chat", [True, False])
    assert chat[0][1][-1] == eos
    assert chat[1][1] == chat[0][1][:-1]


def _rollout(tok: Any, responses: list[str], finished: list[bool]) -> Rollout:
    """A Rollout in ``tok``'s ids; a finished row ends in EOS, a truncated one does not."""
    ids, mask = tokenize_prompts(tok, PROMPTS)
    rows = [
        tok(" " + r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if f else [])
        for r, f in zip(responses, finished, strict=True)
    ]
    width = max(len(r) for r in rows)
    resp = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    rmask = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        resp[i, : len(r)] = torch.tensor(r)
        rmask[i, : len(r)] = 1
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=resp,
        response_mask=rmask,
        group_ids=torch.arange(len(rows)),
        prompts=list(PROMPTS),
        responses=responses,
        finished=torch.tensor(finished),
    )


def _raw_score(model: ScalarHeadModel, ids: list[int]) -> float:
    with torch.no_grad():
        return float(model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))


def test_reward_plugins_score_a_truncated_response_unterminated(
    tiny_lm: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 1.0)  # an untrained head would score every text 0
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    rm_dir = model.save_pretrained(tmp_path / "rm", tok)
    responses = ["red great", "red great"]
    batch = _rollout(tok, responses, finished=[True, False])

    eos = [tok.eos_token_id]
    texts = [tok(p + " red great")["input_ids"] for p in PROMPTS]
    closed = [_raw_score(model, t + eos) for t in texts]
    open_ = [_raw_score(model, t) for t in texts]
    # The reward is read at the last token: the EOS of a finished response only.
    assert min(abs(c - o) for c, o in zip(closed, open_, strict=True)) > 1e-3

    node = {"weight": 1.0, "path": str(rm_dir), "batch_size": 4, "max_length": None}
    cfg = OmegaConf.create({"reward": {"bradley_terry": node}})
    ctx = _ctx(cfg, tmp_path)
    ctx.tokenizer = tok
    scores = bradley_terry.reward(ctx, batch)["bradley_terry"].tolist()
    assert scores == pytest.approx([closed[0], open_[1]], abs=1e-5)

    ens = {"weight": 1.0, "paths": [str(rm_dir)], "mode": "mean", "k": 1.0, "batch_size": 4}
    cfg = OmegaConf.create({"reward": {"rm_ensemble": {**ens, "max_length": None}}})
    ctx = _ctx(cfg, tmp_path)
    ctx.tokenizer = tok
    assert rm_ensemble.reward(ctx, batch)["rm_ensemble"].tolist() == pytest.approx(scores)


# --------------------------------------------------------------------------------------------
# 4. top-k / top-p rollouts are off-policy by the truncation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "shown"), [("rl.top_k=50", "rl.top_k=50"), ("rl.top_p=0.9", "rl.top_p=0.9")]
)
def test_truncated_rl_sampling_is_refused_unless_allowed(
    compose: Any, override: str, shown: str
) -> None:
    for algorithm in ("ppo", "grpo"):
        with pytest.raises(ConfigError, match=rf"^{shown}: .*rl\.allow_truncated_sampling=true"):
            check_config_ranges(compose([f"algorithm={algorithm}", override]))
    check_config_ranges(compose([override, "rl.allow_truncated_sampling=true"]))
    # A stage that samples no RL rollouts does not read the key.
    check_config_ranges(compose([override, "stage=sft"]))


def test_truncated_sampling_flag_defaults_off(compose: Any) -> None:
    assert compose([]).rl.allow_truncated_sampling is False


# --------------------------------------------------------------------------------------------
# 5. group baselines need groups
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_group_algorithms_refuse_one_sample_per_prompt(compose: Any, algorithm: str) -> None:
    overrides = [f"algorithm={algorithm}", "rl.samples_per_prompt=1"]
    pattern = rf"^rl\.samples_per_prompt=1 with algorithm={algorithm}: .*samples_per_prompt >= 2"
    with pytest.raises(ConfigError, match=pattern):
        _check(compose(overrides))
    _check(compose([f"algorithm={algorithm}", "rl.samples_per_prompt=2"]))


def test_the_fingerprint_records_what_the_run_resolves(compose: Any, tmp_path: Path) -> None:
    """Earlier versions wrote the trained reward model's path into the config and fingerprinted
    ``rl.kl_estimator=k1``: the fingerprint of a run that resolves the same values matches."""
    from omegaconf import open_dict

    from alignkit import Artifacts
    from alignkit.cli import registration
    from alignkit.engine.checkpoint import fingerprint_changes, run_fingerprint
    from alignkit.stages.rl import effective_fingerprint

    run_dir = tmp_path / "run"
    cfg = compose(["algorithm=ppo", "reward=[bradley_terry]"])
    manager = PluginManager()
    manager.activate(["ppo", "bradley_terry"])
    _, registry = registration()
    ctx = RunContext(
        cfg=cfg,
        run_dir=run_dir / "rl",
        plugins=manager,
        registry=registry,
        tracker=None,  # type: ignore[arg-type]
        artifacts=Artifacts(reward_model=run_dir / "reward_model"),
    )
    current = effective_fingerprint(ctx, run_dir / "sft", run_dir)
    old_cfg = cfg.copy()
    with open_dict(old_cfg):
        old_cfg.rl.kl_estimator = "k1"
        old_cfg.reward.bradley_terry.path = str(run_dir / "reward_model")
        old_cfg.algorithm.value_model_path = str(run_dir / "reward_model")
    saved = run_fingerprint(old_cfg, run_dir / "sft", run_dir)
    assert fingerprint_changes(saved, current, []) == ([], [])
    assert current["reward.bradley_terry.path"] == "<run_dir>/reward_model"
    # a different estimator is still a different run
    with open_dict(old_cfg):
        old_cfg.rl.kl_estimator = "k2"
    refused, _ = fingerprint_changes(
        run_fingerprint(old_cfg, run_dir / "sft", run_dir), current, []
    )
    assert refused == ["rl.kl_estimator: 'k2' -> 'k1'"]
