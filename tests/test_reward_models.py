"""Preference-model losses against hand-computed values, training on synthetic preferences,
normalisation, ensembles, and scoring rollouts with a reward model whose tokenizer differs from
the policy's."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from alignkit_plugins import bradley_terry, plackett_luce, rating_regression, rm_ensemble
from alignkit_plugins.bradley_terry import BradleyTerryLoss, bradley_terry_loss
from alignkit_plugins.plackett_luce import PlackettLuceLoss, all_pairs_loss, plackett_luce_loss
from alignkit_plugins.rating_regression import RatingRegressionLoss, regression_loss
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from alignkit import Rollout, RunContext
from alignkit.data.feedback import (
    PairwiseFeedback,
    PreferenceGroup,
    RankingFeedback,
    RatingFeedback,
    to_groups,
)
from alignkit.errors import ConfigError
from alignkit.models import TinyModelSpec, build_tiny_model
from alignkit.models.generation import tokenize_prompts
from alignkit.rewards.learned import (
    EnsembleScorer,
    RewardScorer,
    collate_groups,
    ensemble_reward,
    fit_normalization,
    heldout_metrics,
    load_scorer,
    member_folders,
    score_groups,
)
from alignkit.stages.reward_model import (
    TrainSettings,
    score_by_length,
    split_groups,
    train_reward_model,
)

# -------------------------------------------------------------------------------------------
# hand-computed losses. sp(x) = -log sigmoid(x) = log(1 + e^-x), lse = log-sum-exp:
#   sp(1) = 0.3132617, sp(2) = 0.1269280, sp(-0.5) = 0.9740770, sp(0.5) = 0.4740770
#   lse(2, 1, 0) = 2.4076060, lse(1, 0) = 1.3132617
# -------------------------------------------------------------------------------------------

CHOSEN = torch.tensor([1.0, 0.0])
REJECTED = torch.tensor([0.0, 0.5])


def test_bradley_terry_loss_by_hand() -> None:
    # (sp(1) + sp(-0.5)) / 2
    assert bradley_terry_loss(CHOSEN, REJECTED).item() == pytest.approx(0.6436693, abs=1e-6)


def test_bradley_terry_margin_by_hand() -> None:
    # Llama 2 margin on the first pair: (sp(1 - 0.5) + sp(-0.5)) / 2
    margin = torch.tensor([0.5, 0.0])
    loss = bradley_terry_loss(CHOSEN, REJECTED, margin)
    assert loss.item() == pytest.approx(0.7240770, abs=1e-6)


def test_bradley_terry_centering_by_hand() -> None:
    # plain + eta * mean((r_c + r_r)^2) = 0.6436693 + 0.1 * (1^2 + 0.5^2) / 2
    loss = bradley_terry_loss(CHOSEN, REJECTED, center_coef=0.1)
    assert loss.item() == pytest.approx(0.7061693, abs=1e-6)


def test_bradley_terry_label_smoothing_by_hand() -> None:
    # gaps 1 and -0.5; e = 0.2: 0.8 * (sp(1) + sp(-0.5)) / 2 + 0.2 * (sp(-1) + sp(0.5)) / 2
    # sp(-1) = 1.3132617: 0.8 * 0.6436693 + 0.2 * (1.3132617 + 0.4740770) / 2 = 0.6936693
    loss = bradley_terry_loss(CHOSEN, REJECTED, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.6936693, abs=1e-6)
    # the smoothed loss has a finite minimiser: its gradient vanishes at g = log((1-e)/e)
    gap = torch.tensor([math.log(0.8 / 0.2)], requires_grad=True)
    bradley_terry_loss(gap, torch.zeros(1), label_smoothing=0.2).backward()
    assert gap.grad is not None and gap.grad.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("smoothing", [-0.1, 0.5])
def test_bradley_terry_label_smoothing_out_of_range_names_the_key(smoothing: float) -> None:
    from alignkit_plugins.bradley_terry import BradleyTerryConfig, make_loss

    with pytest.raises(ConfigError, match=r"reward\.bradley_terry\.label_smoothing"):
        make_loss(BradleyTerryConfig(label_smoothing=smoothing))


def test_bradley_terry_component_reads_pairs_and_scaled_margins() -> None:
    groups = [
        PreferenceGroup("p", None, ["a", "b"], [0, 1], [(0, 1, 1.0)]),
        PreferenceGroup("q", None, ["c", "d"], [0, 1], [(0, 1, 0.0)]),
    ]
    batch = collate_groups(groups, _CharTokenizer(), max_length=16)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5])  # rows a, b, c, d
    assert BradleyTerryLoss()(rewards, batch).item() == pytest.approx(0.6436693, abs=1e-6)
    # margin_scale 0.5 turns the first pair's margin 1.0 into 0.5
    loss = BradleyTerryLoss(margin_scale=0.5)(rewards, batch)
    assert loss.item() == pytest.approx(0.7240770, abs=1e-6)


R3 = torch.tensor([[2.0, 1.0, 0.0]])
MASK3 = torch.ones(1, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        # -(2 - lse(2, 1, 0)) - (1 - lse(1, 0)); the last response adds nothing
        ([0, 1, 2], 0.7208677),
        # a > {b, c}: only a's draw; the tied last block is unordered
        ([0, 1, 1], 0.4076060),
        # {a, b} > c: Breslow, both against {a, b, c}: -(2 - lse) - (1 - lse)
        ([0, 0, 1], 1.8152119),
    ],
)
def test_plackett_luce_k3_by_hand(ranks: list[int], expected: float) -> None:
    loss = plackett_luce_loss(R3, torch.tensor([ranks]), MASK3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_plackett_luce_is_order_invariant_and_bradley_terry_for_two() -> None:
    perm = [2, 0, 1]
    loss = plackett_luce_loss(R3[:, perm], torch.tensor([[0, 1, 2]])[:, perm], MASK3)
    assert loss.item() == pytest.approx(0.7208677, abs=1e-6)
    two = plackett_luce_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]), MASK3[:, :2])
    assert two.item() == pytest.approx(0.3132617, abs=1e-6)  # sp(1)


def test_plackett_luce_padding_and_all_tied_groups() -> None:
    rewards = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 9.0], [5.0, 1.0, 0.0]])
    ranks = torch.tensor([[0, 1, 2], [0, 1, 0], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [True, True, True]])
    # group 2 is padded to K = 3 (its 9.0 must be ignored); group 3 is all tied: skipped
    loss = plackett_luce_loss(rewards, ranks, mask)
    assert loss.item() == pytest.approx((0.7208677 + 0.3132617) / 2, abs=1e-6)


@pytest.mark.parametrize(
    ("ranks", "expected"),
    [
        ([0, 1, 2], 0.2511505),  # (sp(1) + sp(2) + sp(1)) / 3
        ([0, 1, 1], 0.2200948),  # (sp(1) + sp(2)) / 2: the tie gives no pair
    ],
)
def test_all_pairs_by_hand(ranks: list[int], expected: float) -> None:
    loss = all_pairs_loss(R3, torch.tensor([ranks]), MASK3)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_plackett_luce_component_switches_to_all_pairs() -> None:
    group = PreferenceGroup("p", None, ["a", "b", "c"], [0, 1, 2], [])
    batch = collate_groups([group], _CharTokenizer(), max_length=16)
    rewards = torch.tensor([2.0, 1.0, 0.0])
    assert PlackettLuceLoss()(rewards, batch).item() == pytest.approx(0.7208677, abs=1e-6)
    loss = PlackettLuceLoss(all_pairs=True)(rewards, batch)
    assert loss.item() == pytest.approx(0.2511505, abs=1e-6)


def test_regression_by_hand() -> None:
    # ((1 - 0)^2 + (2 - 0)^2) / 2
    assert regression_loss(torch.tensor([1.0, 2.0]), torch.zeros(2)).item() == 2.5
    ratings = [RatingFeedback("p", "a", 1.0), RatingFeedback("p", "b", 7.0)]
    groups = to_groups(ratings)
    # targets standardised with mean 4, std 3: -1 and +1; rewards 0 and 3 -> (1 + 4) / 2
    batch = collate_groups(groups, _CharTokenizer(), max_length=16, target_stats=(4.0, 3.0))
    loss = RatingRegressionLoss()(torch.tensor([0.0, 3.0]), batch)
    assert loss.item() == pytest.approx(2.5)


def test_ensemble_mean_conservative_and_min_by_hand() -> None:
    scores = torch.tensor([[1.0, 2.0], [3.0, 2.0]])  # (E=2, B=2)
    assert ensemble_reward(scores, "mean").tolist() == [2.0, 2.0]
    # population std per column: [1, 0]; mean - 0.5 * std
    assert ensemble_reward(scores, "conservative", k=0.5).tolist() == [1.5, 2.0]
    assert ensemble_reward(scores, "min").tolist() == [1.0, 2.0]
    with pytest.raises(ConfigError, match="unknown ensemble mode 'max'"):
        ensemble_reward(scores, "max")


def test_collate_runs_a_shared_response_once() -> None:
    groups = [
        PreferenceGroup("p", None, ["a", "b", "c"], [0, 1, 2], [(0, 1, 0.0), (0, 2, 0.0)]),
        PreferenceGroup("p", None, ["b", "a"], [0, 1], [(0, 1, 0.0)]),
    ]
    batch = collate_groups(groups, _CharTokenizer(), max_length=16)
    assert batch.input_ids.shape[0] == 3  # (p, a), (p, b), (p, c)
    assert batch.index.tolist() == [[0, 1, 2], [1, 0, -1]]
    assert batch.chosen.tolist() == [0, 0, 1] and batch.rejected.tolist() == [1, 2, 0]
    # Packed, the prompt "p" is one token shared by the three rows: 1 + 3 * (" x" + EOS).
    assert batch.packed is not None and batch.packed.tokens.numel() == 1 + 3 * 3
    ids, mask = batch.packed.padded(pad_id=0)
    assert torch.equal(ids, batch.input_ids) and torch.equal(mask, batch.attention_mask)


class _CharTokenizer:
    """A stand-in tokenizer for collation tests: one id per character."""

    eos_token_id = 1
    pad_token_id = 0
    bos_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[2 + ord(c) % 50 for c in t] for t in texts]}


# -------------------------------------------------------------------------------------------
# training on a small synthetic preference set
# -------------------------------------------------------------------------------------------

FILLER = ("red", "blue", "cat", "dog", "sun", "tree", "box", "cup")
PROMPTS = [f"Q{i}: describe it." for i in range(40)]


def _response(rng: random.Random, good: int, bad: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, 3))]
    words += ["great"] * good + ["awful"] * bad
    rng.shuffle(words)
    return " ".join(words)


def _quality(response: str) -> int:
    return response.split().count("great") - response.split().count("awful")


def synthetic_feedback(fmt: str, n: int, seed: int) -> list:
    """``great`` makes a response better, ``awful`` worse; learnable by a 1-layer model."""
    rng = random.Random(seed)
    records: list = []
    for i in range(n):
        prompt = rng.choice(PROMPTS)
        if fmt == "pairwise":
            good, bad = _response(rng, 1, 0), _response(rng, 0, 1)
            margin = float(rng.choice([0.0, 1.0]))
            records.append(PairwiseFeedback(prompt, good, bad, margin, f"id{i}"))
        elif fmt == "rankings":
            responses = [_response(rng, 1, 0), _response(rng, 0, 0), _response(rng, 0, 1)]
            rng.shuffle(responses)
            ranks = [1 - _quality(r) for r in responses]
            records.append(RankingFeedback(prompt, responses, ranks, f"id{i}"))
        else:
            for good, bad in ((1, 0), (0, 1), (0, 0)):
                r = _response(rng, good, bad)
                score = 4.0 + 3.0 * _quality(r) + rng.uniform(-0.5, 0.5)
                records.append(RatingFeedback(prompt, r, score, None, f"id{i}"))
    return records


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = [*PROMPTS, *FILLER, "great awful", "User: Assistant:"] * 3
    spec = TinyModelSpec(vocab_size=300, n_layer=1, n_head=2, n_embd=32, n_positions=48, seed=0)
    return build_tiny_model(tmp_path_factory.mktemp("rm_backbone") / "m", corpus, spec)


def _fresh_model(path: Path, seed: int = 0) -> tuple[torch.nn.Module, object]:
    from alignkit.models import ScalarHeadModel

    torch.manual_seed(seed)
    return ScalarHeadModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _ranking_check_groups() -> list[PreferenceGroup]:
    """Held-out rankings (unseen responses), the same yardstick for every variant."""
    return to_groups(synthetic_feedback("rankings", 40, seed=99))


@pytest.mark.parametrize(
    ("fmt", "loss"),
    [
        ("pairwise", BradleyTerryLoss()),
        ("pairwise", BradleyTerryLoss(margin_scale=1.0, center_coef=0.01)),
        ("rankings", PlackettLuceLoss()),
        ("rankings", PlackettLuceLoss(all_pairs=True)),
        ("ratings", RatingRegressionLoss()),
    ],
    ids=["bt", "bt-margin-center", "plackett-luce", "all-pairs", "regression"],
)
def test_each_variant_trains_above_chance(tiny_backbone: Path, fmt: str, loss: object) -> None:
    model, tok = _fresh_model(tiny_backbone)
    groups = to_groups(synthetic_feedback(fmt, 80, seed=1))
    check = _ranking_check_groups()
    scorer = RewardScorer(model, tok, batch_size=32)
    before = heldout_metrics(check, score_groups(scorer, check))["rm_heldout_accuracy"]
    settings = TrainSettings(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, max_length=40)
    metrics = train_reward_model(model, tok, groups, loss, settings)  # type: ignore[arg-type]
    after = heldout_metrics(check, score_groups(scorer, check))["rm_heldout_accuracy"]
    assert after > 0.8, (before, after, metrics)
    assert metrics["rm_pairs_per_second"] > 0


def test_ensemble_trains_above_chance_and_combines_members(tiny_backbone: Path) -> None:
    groups = to_groups(synthetic_feedback("pairwise", 80, seed=1))
    members = []
    for seed in (0, 1):
        model, tok = _fresh_model(tiny_backbone, seed)
        settings = TrainSettings(steps=30, batch_size=8, lr=3e-3, warmup_steps=2, seed=seed)
        train_reward_model(model, tok, groups, BradleyTerryLoss(), settings)
        members.append(RewardScorer(model, tok))
    check = _ranking_check_groups()
    for mode in ("mean", "conservative"):
        ensemble = EnsembleScorer(members, mode=mode, k=1.0)
        assert heldout_metrics(check, score_groups(ensemble, check))["rm_heldout_accuracy"] > 0.8
    prompts, responses = ["Q1: describe it."] * 2, ["great cat", "awful dog"]
    each = torch.stack([m.score(prompts, responses) for m in members])
    expected = each.mean(0) - each.std(0, unbiased=False)
    got = EnsembleScorer(members, mode="conservative").score(prompts, responses)
    assert torch.allclose(got, expected)


# -------------------------------------------------------------------------------------------
# normalisation, saving, held-out metrics
# -------------------------------------------------------------------------------------------


def test_normalisation_is_saved_and_applied_on_load(tiny_backbone: Path, tmp_path: Path) -> None:
    model, tok = _fresh_model(tiny_backbone)
    scorer = RewardScorer(model, tok)
    rng = random.Random(0)
    prompts = [rng.choice(PROMPTS) for _ in range(30)]
    responses = [_response(rng, rng.randint(0, 1), rng.randint(0, 1)) for _ in range(30)]
    mean, std = fit_normalization(scorer, prompts, responses)
    scores = scorer.score(prompts, responses)
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    model.save_pretrained(tmp_path / "rm", tok)
    head = json.loads((tmp_path / "rm" / "config.json").read_text())["alignkit_normalization"]
    assert head["mean"] == pytest.approx(mean) and head["std"] == pytest.approx(std)
    loaded = load_scorer(tmp_path / "rm")
    assert torch.allclose(loaded.score(prompts, responses), scores, atol=1e-5)


def test_load_scorer_refuses_a_folder_without_a_trained_head(tiny_backbone: Path) -> None:
    with pytest.raises(ConfigError, match="not a trained reward model"):
        load_scorer(tiny_backbone, key="reward.bradley_terry.path")


def test_heldout_metrics_against_labels_and_gold() -> None:
    group = PreferenceGroup("p", "x", ["a", "b", "c"], [0, 1, 2], [(0, 1, 0), (0, 2, 0), (1, 2, 0)])
    gold = {"a": 1.0, "b": 0.0, "c": 0.0}
    metrics = heldout_metrics([group], [[3.0, 2.0, 2.5]], lambda g, r: gold[r])
    # labels: a>b yes, a>c yes, b>c no -> 2/3; gold: b == c is a gold tie -> (1 + 1 + 0.5) / 3
    assert metrics["rm_heldout_accuracy"] == pytest.approx(2 / 3)
    assert metrics["rm_gold_agreement"] == pytest.approx(2.5 / 3)
    assert metrics["rm_gold_agreement_noise_free"] == 1.0
    assert metrics["rm_noise_free_pairs"] == 2.0
    other = PreferenceGroup("q", "y", ["a", "b"], [0, 1], [(0, 1, 0)])
    by_kind = heldout_metrics(
        [group, other], [[3.0, 2.0, 2.5], [0.0, 1.0]], lambda g, r: gold[r], lambda g: g.key
    )
    assert by_kind["rm_gold_agreement_noise_free"] == pytest.approx(2 / 3)
    assert by_kind["rm_gold_agreement_noise_free/x"] == 1.0
    assert by_kind["rm_gold_agreement_noise_free/y"] == 0.0


def test_split_keeps_each_prompt_on_one_side() -> None:
    groups = to_groups(synthetic_feedback("pairwise", 200, seed=3))
    train, held = split_groups(groups, 0.2)
    assert held and train
    assert not {g.key for g in train} & {g.key for g in held}
    assert split_groups(groups, 0.2)[1] == held  # stable


# -------------------------------------------------------------------------------------------
# scoring a rollout with a different tokenizer than the policy's
# -------------------------------------------------------------------------------------------


def _two_tokenizer_setup(tmp_path: Path, backbone: Path) -> tuple[Path, object, object]:
    """A trained RM folder on ``backbone`` and a policy tokenizer with another vocabulary."""
    model, tok = _fresh_model(backbone)
    groups = to_groups(synthetic_feedback("pairwise", 40, seed=5))
    settings = TrainSettings(steps=10, batch_size=8, lr=3e-3, warmup_steps=1)
    train_reward_model(model, tok, groups, BradleyTerryLoss(), settings)
    model.mean.fill_(0.25)  # a non-trivial normalisation must be applied too
    model.std.fill_(2.0)
    rm_dir = model.save_pretrained(tmp_path / "rm", tok)
    corpus = [f"User: {p}\nAssistant: {w} great awful" for p in PROMPTS for w in FILLER]
    policy_dir = build_tiny_model(
        tmp_path / "policy",
        corpus,
        TinyModelSpec(vocab_size=400, n_layer=1, n_head=2, n_embd=16, n_positions=64),
    )
    return rm_dir, tok, AutoTokenizer.from_pretrained(policy_dir)


def _rollout(policy_tok: object, prompts: list[str], responses: list[str]) -> Rollout:
    """A Rollout in the policy's token ids (right-padded responses ending in EOS)."""
    ids, mask = tokenize_prompts(policy_tok, prompts)
    eos, pad = policy_tok.eos_token_id, policy_tok.pad_token_id  # type: ignore[attr-defined]
    encoded = [
        policy_tok(" " + r, add_special_tokens=False)["input_ids"] + [eos] for r in responses
    ]  # type: ignore[operator]
    width = max(len(e) for e in encoded)
    resp = torch.full((len(encoded), width), pad, dtype=torch.long)
    rmask = torch.zeros((len(encoded), width))
    for i, e in enumerate(encoded):
        resp[i, : len(e)] = torch.tensor(e)
        rmask[i, : len(e)] = 1
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=resp,
        response_mask=rmask,
        group_ids=torch.arange(len(prompts)),
        prompts=prompts,
        responses=responses,
    )


def test_reward_model_with_another_tokenizer_scores_a_rollout(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    rm_dir, rm_tok, policy_tok = _two_tokenizer_setup(tmp_path, tiny_backbone)
    assert len(policy_tok) != len(rm_tok)  # type: ignore[arg-type]
    prompts = ["User: Q1: describe it.\nAssistant:", "User: Q7: describe it.\nAssistant:"] * 2
    responses = ["red great", "awful cat dog", "sun", "tree box great awful"]
    batch = _rollout(policy_tok, prompts, responses)
    text = prompts[0] + " " + responses[0]
    assert policy_tok(text)["input_ids"] != rm_tok(text)["input_ids"]  # type: ignore[operator]

    # The expected reward, one sequence at a time in the RM's own tokenizer, no padding.
    from alignkit.models import ScalarHeadModel

    rm = ScalarHeadModel.from_pretrained(rm_dir)
    expected = []
    for p, r in zip(prompts, responses, strict=True):
        ids = rm_tok(p + " " + r)["input_ids"] + [rm_tok.eos_token_id]  # type: ignore[operator,attr-defined]
        with torch.no_grad():
            raw = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0, -1]
        expected.append(((raw - 0.25) / 2.0).item())

    cfg = OmegaConf.create(
        {"reward": {"bradley_terry": {"weight": 1.0, "path": str(rm_dir), "batch_size": 3}}}
    )
    cfg.reward.bradley_terry.max_length = None
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, plugins=None, registry=None, tracker=None)  # type: ignore[arg-type]
    ctx.tokenizer = policy_tok
    scores = bradley_terry.reward(ctx, batch)["bradley_terry"]
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)

    # Without texts in the batch the policy's tokens are decoded, then re-encoded.
    bare = _rollout(policy_tok, prompts, responses)
    bare.prompts, bare.responses = [], []
    again = bradley_terry.reward(ctx, bare)["bradley_terry"]
    assert again.tolist() == pytest.approx(expected, abs=1e-5)


def test_reward_plugin_without_a_path_names_the_key(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"reward": {"plackett_luce": {"weight": 1.0, "path": None}}})
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, plugins=None, registry=None, tracker=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"reward\.plackett_luce\.path is not set"):
        plackett_luce.run_start(ctx)
    cfg = OmegaConf.create({"reward": {"rating_regression": {"weight": 1.0, "path": None}}})
    ctx.cfg = cfg
    with pytest.raises(ConfigError, match=r"reward\.rating_regression\.path is not set"):
        rating_regression.run_start(ctx)


def test_ensemble_plugin_expands_member_folders(tiny_backbone: Path, tmp_path: Path) -> None:
    model, tok = _fresh_model(tiny_backbone)
    for i in range(2):
        model.head.bias.data.fill_(float(i))  # member i scores everything i higher
        model.save_pretrained(tmp_path / "rm" / f"member_{i}", tok)
    assert [p.name for p in member_folders(tmp_path / "rm")] == ["member_0", "member_1"]
    node = {"weight": 1.0, "paths": [str(tmp_path / "rm")], "mode": "conservative", "k": 2.0}
    cfg = OmegaConf.create({"reward": {"rm_ensemble": {**node, "batch_size": 8}}})
    cfg.reward.rm_ensemble.max_length = None
    ctx = RunContext(cfg=cfg, run_dir=tmp_path, plugins=None, registry=None, tracker=None)  # type: ignore[arg-type]
    rm_ensemble.run_start(ctx)
    prompts, responses = ["User: Q1: describe it.\nAssistant:"], ["red great"]
    base = RewardScorer(model, tok).score(prompts, responses) - 1.0  # member 0
    got = rm_ensemble.reward(ctx, _rollout(tok, prompts, responses))["rm_ensemble"]
    # members base and base + 1: mean base + 0.5, population std 0.5 -> base + 0.5 - 2 * 0.5
    assert got.tolist() == pytest.approx((base - 0.5).tolist(), abs=1e-5)


def test_length_sorted_chunks_score_like_one_batch(tiny_backbone: Path) -> None:
    """``score_by_length`` skips padding columns; scores and gradients are unchanged."""
    model, tok = _fresh_model(tiny_backbone)
    model.train()
    texts = [
        f"User: {p}\nAssistant: {' '.join(FILLER[: 1 + i % 5])}" for i, p in enumerate(PROMPTS)
    ]
    batch = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 2  # lengths differ, so chunks are cut differently
    chunked = score_by_length(model, ids, mask, rows=3)
    chunked.pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole = model.score(ids, mask)
    whole.pow(2).sum().backward()
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    for got, param in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(got, param.grad, atol=1e-5, rtol=1e-4)
