"""The benchmark suite: analytic FLOP counts, the FLOP counter's hooks, and a smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit.batch import Rollout
from alignkit.models.flops import (
    DecoderShape,
    decode_flops,
    forward_flops,
    last_token_flops,
    packed_forward_flops,
    packed_last_token_flops,
    train_flops,
)
from alignkit.models.generation import GenerationOutput, generate
from alignkit.rl.update import (
    Counts,
    OptimTarget,
    PolicyLossSpec,
    length_sorted,
    policy_logprobs,
    policy_loss,
    run_minibatch_updates,
    used_columns,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is a top-level folder, not an installed package

from benchmarks.common import WORKLOADS, model_matmuls  # noqa: E402
from benchmarks.flop_counter import FlopCounter  # noqa: E402
from benchmarks.patches import apply_patches  # noqa: E402
from benchmarks.run import (  # noqa: E402
    arch_spec,
    format_table,
    gpt2_reference,
    main,
    meta_model,
    parameter_counts,
    parse_args,
)
from benchmarks.scaling import plot  # noqa: E402

SHAPE = DecoderShape(n_layer=2, n_embd=4, vocab_size=10)


def test_matmul_params_by_hand() -> None:
    # 2 layers x (4 d^2 attention + 2 d (4 d) MLP) = 2 x (64 + 128)
    assert SHAPE.matmul_params == 384
    assert DecoderShape(n_layer=1, n_embd=4, vocab_size=10, n_inner=8).matmul_params == 128


def test_forward_flops_by_hand() -> None:
    # per row: linear 2*384*5 = 3840, attention 4*2*5*5*4 = 800, head 2*4*10*2 = 160
    assert forward_flops(SHAPE, rows=3, seq_len=5, logit_positions=2) == 3 * 4800
    assert train_flops(SHAPE, rows=3, seq_len=5, logit_positions=2) == 3 * 3 * 4800
    # one cached token attending over 7 keys: 768 + 4*2*1*7*4 + 80
    assert forward_flops(SHAPE, 1, 1, 1, context=7) == 768 + 224 + 80


def test_decode_flops_by_hand() -> None:
    # prefill over 3 tokens (2304 + 288 + 80), then steps with 4 and 5 keys (976, 1008)
    assert decode_flops(SHAPE, rows=1, prompt_len=3, new_tokens=3) == 2672 + 976 + 1008
    assert decode_flops(SHAPE, rows=2, prompt_len=3, new_tokens=1) == 2 * 2672


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=10, n_positions=16, n_embd=4, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0  # deterministic in train()
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()


def test_counter_matches_the_formula_on_a_real_forward() -> None:
    model = tiny_gpt2()
    counter = FlopCounter().attach(model, "policy")
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=2)
    assert counter.total("policy", grad=False) == forward_flops(SHAPE, 3, 5, 2)
    assert counter.total(grad=True) == 0.0
    counter.reset()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # grad on: a training pass
    assert counter.total("policy", grad=True) == train_flops(SHAPE, 3, 5, 5)


def test_counter_sees_the_kv_cache_context() -> None:
    model = tiny_gpt2()
    counter = FlopCounter().attach(model, "policy")
    ids = torch.randint(0, 10, (1, 3))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones(1, 3), logits_to_keep=1)
        model(
            input_ids=ids[:, :1],
            attention_mask=torch.ones(1, 4),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    assert counter.total() == decode_flops(SHAPE, rows=1, prompt_len=3, new_tokens=2)
    counter.detach()
    with torch.no_grad():
        model(input_ids=ids)
    assert counter.total() == decode_flops(SHAPE, rows=1, prompt_len=3, new_tokens=2)


def test_counter_counts_lean_decoding_like_the_model_forward() -> None:
    """The lean GPT-2 path skips module hooks; the counter sees its calls as observer."""
    model = tiny_gpt2()
    counter = FlopCounter().attach(model, "policy")
    prompt_ids = torch.randint(1, 10, (2, 3), generator=torch.Generator().manual_seed(2))
    totals = []
    for lean in (True, False):
        counter.reset()
        out = generate(
            model,
            prompt_ids,
            torch.ones_like(prompt_ids),
            max_new_tokens=4,
            eos_token_id=99,  # never sampled: every row runs all 4 tokens
            pad_token_id=0,
            generator=torch.Generator().manual_seed(0),
            lean=lean,
        )
        assert out.response_ids.shape == (2, 4)
        totals.append(counter.total("policy", grad=False))
    # prefill over 3 tokens (one logit position per row) and 3 decode steps
    assert totals[0] == totals[1] == decode_flops(SHAPE, rows=2, prompt_len=3, new_tokens=4)
    counter.detach()


def test_last_token_flops_by_hand() -> None:
    # d=4, f=16, L=2, T=3, one row: layer 0 full = 2*(16+32+... ) via forward_flops of one
    # layer: 2*(4*16 + 2*4*16)*3 + 4*3*3*4 = 1152 + 144; last layer: K,V 4*16*3 = 192,
    # the read token's query 2*16 = 32, attention 4*3*4 = 48, projection 2*16 = 32,
    # MLP 4*4*16 = 256.
    assert last_token_flops(SHAPE, rows=1, seq_len=3) == 1152 + 144 + 192 + 32 + 48 + 32 + 256
    assert last_token_flops(SHAPE, rows=2, seq_len=3) == 2 * last_token_flops(SHAPE, 1, 3)


def test_packed_last_token_flops_by_hand() -> None:
    # 6 distinct tokens in 3 rows of width 4 (d=4, f=16, L=2): layer 0's linear layers
    # 2*192*6 = 2304 and attention 4*3*4*4*4 = 768; last layer K,V 4*16*6 = 384, then per row
    # query 32 + attention 4*4*4 = 64 + projection 32 + MLP 256 = 384, x3 = 1152.
    assert packed_last_token_flops(SHAPE, tokens=6, rows=3, width=4) == 2304 + 768 + 384 + 1152
    # One unshared row is the padded last-token forward.
    assert packed_last_token_flops(SHAPE, 3, 1, 3) == last_token_flops(SHAPE, rows=1, seq_len=3)


def test_packed_forward_flops_by_hand() -> None:
    # linear layers 2*384*6 = 4608, attention 4*2 layers*3 rows*4^2*4 = 1536, head 2*4*10*5
    assert packed_forward_flops(SHAPE, tokens=6, rows=3, width=4, logit_positions=5) == 6544


def test_counter_counts_the_packed_policy_forward(tmp_path: Path) -> None:
    from alignkit.models import response_logprobs

    model = tiny_gpt2().train()
    counter = FlopCounter().attach(model, "policy")
    prompts, responses = torch.tensor([[1, 2], [1, 2]]), torch.tensor([[3, 4], [5, 0]])
    logp = response_logprobs(
        model, prompts, torch.ones_like(prompts), responses, torch.tensor([[1, 1], [1, 0]])
    )
    logp.sum().backward()
    # 5 distinct tokens (the prompt once) in 2 rows of width 4, 2 x 2 read positions
    assert counter.total("policy", grad=True) == 3 * (3840 + 1024 + 320)
    counter.detach()


def test_counter_counts_the_lean_reward_forward_as_a_training_pass(tmp_path: Path) -> None:
    from alignkit.models import ScalarHeadModel

    tiny_gpt2().save_pretrained(tmp_path / "m")
    model = ScalarHeadModel.from_pretrained(tmp_path / "m")
    counter = FlopCounter().attach(model, "rm")
    ids = torch.randint(0, 10, (2, 3))
    model.score(ids, torch.ones_like(ids)).sum().backward()
    assert counter.total("rm", grad=True) == 3 * last_token_flops(SHAPE, rows=2, seq_len=3)
    counter.detach()


def test_quick_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code = main(["--quick", "--inline", "--no-trl", "--no-scaling", "--threads=1", f"--out={out}"])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {
        "generation/alignkit",
        "grpo/alignkit",
        "ppo/alignkit",
        "reward_model/alignkit",
    }
    for key, res in report["results"].items():
        sec = res["seconds_per_step"]
        assert sec["total"] > 0, key
        parts = sum(v for k, v in sec.items() if k != "total")
        assert parts == pytest.approx(sec["total"]), key
        assert res["flops_per_step"]["total"] > 0, key
        assert res["peak_rss_mib"] > 0
        assert res["derived"]["samples_per_s"] > 0
        assert res["derived"]["util_step"] > 0
    grpo = report["results"]["grpo/alignkit"]
    # 2 prompts x 2 samples, the reference model's forward and one update per step
    assert grpo["samples_per_step"] == 4
    assert grpo["seconds_per_step"]["ref"] > 0 and grpo["flops_per_step"]["ref"] > 0
    assert grpo["seconds_per_step"]["old"] == 0  # the rollout's log-probs are reused
    ppo = report["results"]["ppo/alignkit"]
    assert ppo["flops_per_step"]["value"] > 0  # the critic: here its forward, backward and step
    assert report["matmul_ceiling"]["train"]["gflops"] > 0
    table = (out / "results.txt").read_text()
    assert "grpo/alignkit" in table and "matmul ceiling" in table
    assert table.strip() == format_table(report).strip()


def test_bad_workload_is_named() -> None:
    with pytest.raises(SystemExit):
        main(["--workloads=grpo,dpo_typo", "--no-scaling"])


def test_scaling_plot_is_a_png(tmp_path: Path) -> None:
    point = {"total": 1.0, "generation": 0.4, "update": 0.5, "ref": 0.1, "flops": 1e9}
    curves = {
        axis: [{**point, "x": x}, {**point, "x": 2 * x, "total": 2.0}]
        for axis, x in (("prompts", 4), ("new_tokens", 8), ("width", 256))
    }
    png = tmp_path / "scaling.png"
    plot(curves, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trl_side_runs_at_a_tiny_size(tmp_path: Path, arch: str) -> None:
    pytest.importorskip("trl", reason="TRL is the optional 'bench' extra")
    out = tmp_path / "bench"
    args = ["--quick", "--inline", "--trl", "--no-scaling", "--threads=1", f"--out={out}"]
    assert main([*args, "--workloads=grpo,reward_model", f"--arch={arch}"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["ratios"]) == {"grpo", "reward_model"}
    trl = report["results"]["grpo/trl"]
    assert trl["seconds_per_step"]["generation"] > 0 and trl["flops_per_step"]["update"] > 0


# --------------------------------------------------------------------------------------------
# other architectures: --arch llama, and the per-architecture comparison
# --------------------------------------------------------------------------------------------


def test_reference_llama_matches_the_gpt2_model() -> None:
    """The default ``--arch llama``: GPT-2's depth, width and heads (head_dim 64), half the
    key/value heads, and the MLP width whose parameter counts are nearest GPT-2's."""
    from alignkit.models.tiny import tiny_config

    values = vars(parse_args([]))
    spec = arch_spec(values, "llama")
    assert (spec.layers, spec.hidden, spec.heads, spec.kv_heads) == (4, 256, 4, 2)
    assert spec.hidden // spec.heads == 64 and not spec.chat
    assert spec.intermediate % 8 == 0 and abs(spec.intermediate - 3 * 256) <= 32  # GQA: ~3d
    tok, gpt2 = gpt2_reference(values)
    llama = parameter_counts(meta_model(tiny_config(spec, tok)))
    for key in ("parameters", "non_embedding_parameters"):
        assert llama[key] == pytest.approx(gpt2[key], rel=0.01), key
    assert 3.3e6 < llama["parameters"] < 3.5e6


def test_matmul_shapes_are_read_from_the_model() -> None:
    """GPT-2's fused QKV and 4d MLP, Llama's grouped K/V and three-matrix gated MLP."""
    from transformers import LlamaConfig

    shapes = [(m.name, m.inner, m.out, m.count) for m in model_matmuls(tiny_gpt2())]
    assert shapes == [
        ("qkv", 4, 12, 2),
        ("attn_out", 4, 4, 2),
        ("mlp_up", 4, 16, 2),
        ("mlp_down", 16, 4, 2),
        ("lm_head", 4, 10, 1),
    ]
    config = LlamaConfig(
        vocab_size=10,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=96,
    )
    shapes = [(m.name, m.inner, m.out, m.count) for m in model_matmuls(meta_model(config))]
    assert shapes == [
        ("q_proj+o_proj", 64, 64, 6),
        ("k_proj+v_proj", 64, 32, 6),
        ("gate_proj+up_proj", 64, 96, 6),
        ("down_proj", 96, 64, 3),
        ("lm_head", 64, 10, 1),
    ]


def test_counter_hooks_a_llama_trunk_in_both_heads() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=10,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=96,
        pad_token_id=0,
    )
    shape = DecoderShape.from_config(config)
    ids = torch.randint(1, 10, (3, 5))
    for cls, positions in ((LlamaForCausalLM, 2), (LlamaForSequenceClassification, 0)):
        kwargs = {"logits_to_keep": 2} if positions else {}
        model = cls(config).eval()
        counter = FlopCounter().attach(model, "m")
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        assert counter.total("m", grad=False) == forward_flops(shape, 3, 5, positions), cls
        counter.detach()


def test_quick_llama_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--quick", "--inline", "--no-trl", "--no-scaling", "--threads=1", f"--out={out}"]
    assert main([*args, "--arch=llama"]) == 0
    report = json.loads((out / "results.json").read_text())
    model = report["model"]
    assert model["arch"] == "llama" and model["head_dim"] >= 32
    assert model["kv_heads"] == model["heads"] // 2
    assert model["parameters"] == pytest.approx(model["matched_to"]["parameters"], rel=0.05)
    assert set(report["results"]) == {f"{w}/alignkit" for w in WORKLOADS}
    for key, res in report["results"].items():
        assert res["seconds_per_step"]["total"] > 0, key
        assert res["flops_per_step"]["total"] > 0, key
        assert res["derived"]["util_step"] > 0, key
    assert report["results"]["reward_model/alignkit"]["trained_tokens_per_step"] > 0
    table = (out / "results.txt").read_text()
    assert "model: llama" in table and "matched to gpt2" in table
    assert table.strip() == format_table(report).strip()


def test_arch_comparison_gives_cost_per_token_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--quick", "--inline", "--no-trl", "--no-scaling", "--threads=1", f"--out={out}"]
    assert main([*args, "--arch=gpt2,llama", "--workloads=generation,reward_model"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert list(report["archs"]) == ["gpt2", "llama"]
    for arch, part in report["archs"].items():
        assert part["model"]["arch"] == arch
        assert set(part["results"]) == {"generation/alignkit", "reward_model/alignkit"}
        assert part["matmul_ceiling"]["train"]["gflops"] > 0
    comparison = report["arch_comparison"]
    assert comparison["reference"] == "gpt2"
    rows = comparison["workloads"]
    assert rows["generation/alignkit"]["per"] == "generated token"
    assert rows["reward_model/alignkit"]["per"] == "trained token"
    for key, row in rows.items():
        spt = row["seconds_per_token"]
        results = {a: report["archs"][a]["results"][key] for a in ("gpt2", "llama")}
        tokens = {a: row["tokens_per_step"][a] for a in results}
        assert spt["gpt2"] == pytest.approx(
            results["gpt2"]["seconds_per_step"]["total"] / tokens["gpt2"]
        ), key
        # one round: the ratio is that round's
        assert row["ratio"]["llama"] == pytest.approx(spt["llama"] / spt["gpt2"]), key
        assert row["ratio_per_round"]["llama"] == [row["ratio"]["llama"]]
    # the same tokenizer: the reward model trains on the same tokens with both models
    tokens = rows["reward_model/alignkit"]["tokens_per_step"]
    assert tokens["gpt2"] == tokens["llama"] > 0
    table = (out / "results.txt").read_text()
    assert "=== gpt2 ===" in table and "=== llama ===" in table and "llama/gpt2" in table
    assert table.strip() == format_table(report).strip()


def test_bad_arch_is_named() -> None:
    for arch in ("llama2", "gpt2,gpt2", ""):
        with pytest.raises(SystemExit):
            parse_args([f"--arch={arch}"])


def test_documented_commands_parse() -> None:
    """Every ``python -m benchmarks`` command in docs/benchmarks.md is accepted as written
    (the quick runs above execute the same paths)."""
    import re
    import shlex

    doc = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    commands = re.findall(r"python -m benchmarks(?![.\w])([^\n`#]*)", doc)
    assert any("--arch" in c for c in commands)
    for command in commands:
        parse_args(shlex.split(command))


# --------------------------------------------------------------------------------------------
# speed changes keep results: padding trimmed per micro-batch, micro-batches sorted by length
# --------------------------------------------------------------------------------------------


def varied_batch() -> Rollout:
    """6 rows with prompts of 2..5 tokens (left-padded to 5) and responses of 1..4 (to 6)."""
    gen = torch.Generator().manual_seed(0)
    prompt_lens, resp_lens = [5, 2, 3, 2, 4, 3], [4, 1, 2, 3, 1, 2]
    prompt_mask = torch.tensor([[0] * (5 - n) + [1] * n for n in prompt_lens])
    response_mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in resp_lens])
    prompt_ids = torch.randint(1, 10, (6, 5), generator=gen) * prompt_mask
    response_ids = torch.randint(1, 10, (6, 6), generator=gen) * response_mask.long()
    batch = Rollout(prompt_ids, prompt_mask, response_ids, response_mask, torch.arange(6) // 2)
    batch.logprobs = -torch.rand(6, 6, generator=gen) * response_mask
    batch.ref_logprobs = -torch.rand(6, 6, generator=gen) * response_mask
    batch.advantages = torch.randn(6, 1, generator=gen) * response_mask
    return batch


def fake_ctx(model: torch.nn.Module) -> SimpleNamespace:
    cfg = OmegaConf.create({"rl": {"temperature": 0.7}})
    return SimpleNamespace(policy=model, cfg=cfg)


def test_used_columns_by_hand() -> None:
    batch = varied_batch()
    # rows 1 and 3: prompts of 2 tokens (columns 3..4), responses of 1 and 3 tokens
    assert used_columns(batch.prompt_mask[[1, 3]], batch.response_mask[[1, 3]]) == (3, 3)
    assert used_columns(batch.prompt_mask, batch.response_mask) == (0, 4)
    empty = torch.zeros(2, 6)
    assert used_columns(batch.prompt_mask[[1, 3]], empty) == (3, 1)  # one column kept


def test_trimmed_logprobs_equal_the_full_forward() -> None:
    model = tiny_gpt2()
    ctx = fake_ctx(model)
    batch = varied_batch()
    for rows in (torch.tensor([1, 3]), torch.tensor([0, 2, 5]), torch.arange(6)):
        full = policy_logprobs(ctx, batch, rows, trim_padding=False)
        fast = policy_logprobs(ctx, batch, rows)
        assert fast[0].shape == (len(rows), 6)
        torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=1e-5)
        mask = batch.response_mask[rows] != 0
        torch.testing.assert_close(fast[1][mask], full[1][mask], atol=1e-5, rtol=1e-5)
        assert bool((fast[0][~mask] == 0).all())


def test_length_sorted_only_reorders_within_a_step() -> None:
    lengths = torch.tensor([3, 9, 5, 9, 1, 7])
    rows = torch.tensor([4, 0, 3, 1, 5, 2])
    assert length_sorted(rows, lengths, 2).tolist() == [3, 1, 5, 2, 0, 4]
    assert length_sorted(rows, lengths, 6).tolist() == rows.tolist()  # one micro-batch
    assert length_sorted(rows, None, 2).tolist() == rows.tolist()


def one_update(trim: bool, sort: bool) -> tuple[dict[str, float], list[torch.Tensor]]:
    model = tiny_gpt2().train()
    ctx = fake_ctx(model)
    batch = varied_batch()
    spec = PolicyLossSpec(kl_coef=0.05, kl_estimator="k3", loss_agg="token_mean")
    target = OptimTarget("policy", list(model.parameters()), [], max_grad_norm=1e9)

    def loss_fn(rows: torch.Tensor, counts: Counts) -> tuple[torch.Tensor, dict]:
        logp, entropy = policy_logprobs(ctx, batch, rows, trim_padding=trim)
        return policy_loss(batch, rows, counts, logp, entropy, spec)

    lengths = batch.prompt_mask.sum(1) + batch.response_mask.sum(1)
    metrics = run_minibatch_updates(
        loss_fn,
        batch.response_mask,
        [target],
        epochs=1,
        minibatch_size=2,
        grad_accum_steps=3,
        max_len=6,
        lengths=lengths if sort else None,
    )
    return metrics, [p.grad.clone() for p in model.parameters()]


def test_update_is_unchanged_by_trimming_and_sorting() -> None:
    base_metrics, base_grads = one_update(trim=False, sort=False)
    metrics, grads = one_update(trim=True, sort=True)
    assert metrics.keys() == base_metrics.keys()
    for key, value in base_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for fast, full in zip(grads, base_grads, strict=True):
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-4)
    assert any(float(g.abs().sum()) > 0 for g in grads)  # the comparison is not vacuous


# --------------------------------------------------------------------------------------------
# candidate patches measured by the benchmarks compute the same thing
# --------------------------------------------------------------------------------------------


def test_fused_gelu_patch_matches_and_is_undone() -> None:
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-6, 6, 1001)
    before = NewGELUActivation()(x)
    with apply_patches(["fused_gelu"]):
        fused = NewGELUActivation()(x)
    torch.testing.assert_close(fused, before, atol=1e-6, rtol=0)
    assert torch.equal(NewGELUActivation()(x), before)
    with pytest.raises(SystemExit, match="unknown"), apply_patches(["typo"]):
        pass


def test_hf_decode_patch_decodes_through_the_model_forward_with_the_same_tokens() -> None:
    from alignkit.models import generation
    from alignkit.models.lean import observe_only

    model = tiny_gpt2()
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]])
    prompt_ids = torch.randint(1, 10, (3, 4), generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    handle = model.transformer.register_forward_pre_hook(observe_only(lambda *_: calls.append(1)))

    def sample() -> GenerationOutput:
        return generation.generate(
            model,
            prompt_ids,
            prompt_mask,
            max_new_tokens=6,
            eos_token_id=3,
            pad_token_id=0,
            generator=torch.Generator().manual_seed(0),
        )

    lean = sample()
    assert calls == []  # the lean path does not call the model's forward
    with apply_patches(["hf_decode"]):
        hf = sample()
    assert len(calls) >= 2  # prefill and at least one decode step
    assert generation.generate is generate
    handle.remove()
    assert torch.equal(lean.response_ids, hf.response_ids)
    assert torch.equal(lean.response_mask, hf.response_mask)
    torch.testing.assert_close(lean.logprobs, hf.logprobs, atol=1e-5, rtol=1e-5)


def test_padded_patch_runs_the_padded_forwards_with_the_same_values() -> None:
    from alignkit.models import hf as models
    from alignkit.models.lean import observe_only
    from alignkit.rl import update as training

    model = tiny_gpt2()
    calls: list[int] = []
    model.register_forward_pre_hook(observe_only(lambda *_: calls.append(1)))
    prompts = torch.tensor([[0, 1, 2], [0, 1, 2], [4, 5, 6]])
    p_mask = (prompts != 0).long()
    responses = torch.tensor([[3, 4, 0], [5, 6, 7], [8, 0, 0]])
    r_mask = (responses != 0).float()
    packed = models.response_logprobs(model, prompts, p_mask, responses, r_mask)
    assert calls == [] and training.packs(model)
    with apply_patches(["padded"]):
        padded = models.response_logprobs(model, prompts, p_mask, responses, r_mask)
        assert not training.packs(model)
    assert calls == [1]  # the model's own (padded) forward ran under the patch
    assert training.packs(model) and models.pack_rollout(prompts, p_mask, responses, r_mask)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_index_gather_patch_gathers_by_advanced_indexing_with_the_same_values_and_grads() -> None:
    from alignkit.models import hf as models
    from alignkit.models import lean

    model = tiny_gpt2()
    prompts = torch.tensor([[0, 1, 2], [0, 1, 2], [4, 5, 6]])
    p_mask = (prompts != 0).long()
    responses = torch.tensor([[3, 4, 0], [5, 6, 7], [8, 0, 0]])
    r_mask = (responses != 0).float()

    def logprobs_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = models.response_logprobs(model, prompts, p_mask, responses, r_mask)
        assert isinstance(out, torch.Tensor)
        out.sum().backward()
        grad = model.transformer.h[0].attn.c_attn.weight.grad
        assert grad is not None
        return out.detach(), grad.clone()

    take = lean._take
    selected = logprobs_and_grad()
    with apply_patches(["index_gather"]):
        assert lean._take is not take
        indexed = logprobs_and_grad()
    assert lean._take is take
    torch.testing.assert_close(selected[0], indexed[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(selected[1], indexed[1], atol=1e-6, rtol=1e-5)


def test_prefill_rows_and_critic_forwards_patches_swap_and_restore() -> None:
    """``prefill_rows`` samples the same tokens from every row's prefill; ``critic_forwards``
    turns the PPO critic's single forward off. Both are undone after the block."""
    import alignkit_plugins.ppo as ppo

    from alignkit.models import lean
    from alignkit.models.generation import generate

    model = tiny_gpt2()
    prompts = torch.tensor([[0, 1, 2], [0, 1, 2], [4, 5, 6], [0, 1, 2]])
    mask = (prompts != 0).long()

    def sample() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        out = generate(
            model, prompts, mask, max_new_tokens=4, eos_token_id=9, pad_token_id=0, generator=gen
        )
        return out.response_ids

    prefill, once = lean.LeanDecoder.prefill, ppo._critic_steps_once
    distinct = sample()
    with apply_patches(["prefill_rows", "critic_forwards"]):
        assert lean.LeanDecoder.prefill is not prefill
        assert ppo._critic_steps_once(None, None, None) is False
        every_row = sample()
    assert lean.LeanDecoder.prefill is prefill and ppo._critic_steps_once is once
    assert torch.equal(distinct, every_row)
