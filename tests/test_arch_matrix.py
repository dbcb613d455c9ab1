"""The architecture matrix: every tiny architecture of :mod:`alignkit.models.tiny` (Llama,
Qwen2, Mistral, Gemma, GPT-NeoX, GPT-2; a new entry of ``ARCHITECTURES`` joins by itself)
through the whole of alignkit on the built-in task (``task=assist``, whose gold oracle lets
the simulated human label feedback), with ``model=hf model.path=<the tiny model folder>``:

1. the pipeline (SFT -> feedback -> reward model -> PPO -> eval), then every registered RL
   algorithm (both critics of PPO) a few steps from its SFT policy and reward model, each
   evaluated against the SFT policy;
2. RL with LoRA on the default target modules (``all-linear``): only adapters change, the
   run's policy and its exported checkpoint load as plain causal LMs;
3. FSDP on 2 gloo ranks: the same RL run as one process, metric for metric (one torchrun
   launch for all architectures, ``tests/arch_matrix_fsdp.py``);
4. the per-token log-probs recorded while sampling (lean and plain decoding, left-padded
   prompts of different lengths) equal a padded forward's and the model's own unpadded one.

Budget: each model is built once, each architecture's pipeline runs once and its SFT policy
and reward model feed every RL case; runs go through :func:`alignkit.cli.run_stage` in this
process (composed exactly as the ``alignkit`` command composes them), so the command's
start-up is not paid per run. Sizes are tiny: the point is that every stage runs and produces
the right artefacts on every architecture, not what it learns.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.models.tiny import ARCHITECTURES, TinyArchSpec, build_tiny_causal_lm
from alignkit.tracking import read_metrics

from .conftest import REPO, cli_env

# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------

RL_BUDGET = [
    "rl.steps=2",
    "rl.prompts_per_step=4",
    "rl.samples_per_prompt=2",
    "rl.max_new_tokens=8",
    "rl.samples_every=1",
]
EVAL_BUDGET = ["eval.num_prompts=8", "eval.samples_per_prompt=1", "eval.max_new_tokens=8"]
PIPELINE_BUDGET = [
    "task.demonstrations=200",
    "sft.steps=30",
    "sft.batch_size=8",
    "sft.log_every=5",
    "feedback.num_prompts=8",
    "feedback.samples_per_prompt=4",
    "feedback.max_new_tokens=8",
    # A policy 30 SFT steps old mostly scores 0 with the gold oracle: without noise the
    # annotator ranks all of a prompt's responses equal and there is no pair to learn from.
    "feedback.noise=1.0",
    "reward_model.steps=6",
    "reward_model.batch_size=4",
    "reward_model.max_length=64",
    "reward_model.normalize_samples=16",
    "pipeline.select_every=0",  # two RL steps: nothing to choose among
    *RL_BUDGET,
    *EVAL_BUDGET,
]
LORA_RANK = 4


def _algorithms() -> list[str]:
    """Every algorithm a plugin registers (``algorithm=<name>``), as the command sees them."""
    from hydra.core.config_store import ConfigStore

    from alignkit.cli import registration

    registration()
    names = ConfigStore.instance().list("algorithm")
    return sorted(name.removesuffix(".yaml") for name in names)


OFFLINE = {"dpo"}
"""Algorithms that train on stored preference pairs (the pipeline's feedback here), unscored."""


def _rl_cases() -> list[tuple[str, list[str]]]:
    """``(case id, overrides)`` per algorithm; one with a ``value_model`` choice gets a case
    per critic (``{rm}`` is the architecture's reward model, the InstructGPT initialisation
    that the pipeline also uses)."""
    from hydra.core.config_store import ConfigStore

    cases = []
    for name in _algorithms():
        node = ConfigStore.instance().load(f"algorithm/{name}.yaml").node
        if "value_model" in node:
            cases.append((f"{name}-shared", [f"algorithm={name}", "algorithm.value_model=shared"]))
            separate = ["algorithm.value_model=separate", "algorithm.value_model_path={rm}"]
            cases.append((f"{name}-separate", [f"algorithm={name}", *separate]))
        elif name in OFFLINE:
            cases.append((name, [f"algorithm={name}", "algorithm.data={feedback}"]))
        else:
            cases.append((name, [f"algorithm={name}"]))
    return cases


RL_CASES = _rl_cases()
# The loss metrics each algorithm must log every step (default ``loss/policy``).
ALGORITHM_LOSSES = {"ppo": ("loss/policy", "loss/value"), "grpo": ("loss/policy", "kl/loss")}
# The FSDP cases: PPO with a separate critic (two sharded models, GAE, the clipped update)
# and REINFORCE++ (the critic-free clipped update). Two ranks and one process sample the same
# responses (sampling does not depend on the number of ranks).
FSDP_CASES = {
    "ppo-separate": [
        "algorithm=ppo",
        "algorithm.value_model=separate",
        "algorithm.value_model_path={rm}",
    ],
    "reinforce_pp": ["algorithm=reinforce_pp"],
}
# Float sums in another order (sharded gradients, their norm): measured up to 1.3e-5 relative
# on gradient norms, 1.5e-6 absolute on a KL of ~1e-6.
RTOL, ATOL = 5e-5, 1e-5


def assert_weights_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], adam_steps: int, lr: float = 1e-4
) -> None:
    """Final weights of two runs that differ only in the order of float sums.

    Every element within 2e-5 (rounding grown by a few Adam steps), except a few whose
    gradient is at the rounding level: Adam divides by sqrt(v), so noise-sized gradients take
    steps of up to ``lr`` whose sign differs between the runs. Attention key biases are all
    such (their exact gradient is 0: softmax ignores a per-query constant); elsewhere a
    gradient that happens to be ~0 is rare. Those get the bound of ``adam_steps`` steps, for
    key biases in full and elsewhere for at most 0.5% of a tensor's elements.
    """
    assert a.keys() == b.keys()
    bound = adam_steps * lr * 1.1
    for name in a:
        diff = (a[name].double() - b[name].double()).abs()
        assert diff.max() <= bound, (name, diff.max().item(), bound)
        if name.endswith(("c_attn.bias", "k_proj.bias", "query_key_value.bias")):
            continue
        loose = int((diff > 2e-5 + RTOL * b[name].abs()).sum())
        assert loose <= max(1, diff.numel() // 200), (name, loose, diff.numel())


# --------------------------------------------------------------------------------------------
# running alignkit in this process
# --------------------------------------------------------------------------------------------


class Runner:
    """``alignkit OVERRIDES run_dir=...`` in this process: the same composition and
    :func:`alignkit.cli.run_stage` as the command, without its start-up per run."""

    def __init__(self) -> None:
        from alignkit.cli import registration

        self.manager, self.registry = registration()

    def __call__(self, overrides: Sequence[str], run_dir: Path) -> dict[str, Any]:
        from hydra import compose, initialize_config_module

        from alignkit.cli import run_stage

        full = ["logger=none", *overrides, f"run_dir={run_dir}"]
        with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
            cfg = compose(config_name="config", overrides=full)
        return run_stage(cfg, run_dir, self.manager, self.registry)


class Once:
    """``fn(key)`` computed once per key; a failure is remembered, not retried per test."""

    def __init__(self, what: str, fn: Callable[[str], Any]) -> None:
        self.what, self.fn = what, fn
        self.done: dict[str, tuple[bool, Any]] = {}

    def __call__(self, key: str) -> Any:
        if key in self.done:
            ok, value = self.done[key]
            if not ok:
                pytest.fail(f"{self.what} of {key} failed (see its first test): {value!r}")
            return value
        try:
            value = self.fn(key)
        except BaseException as exc:
            self.done[key] = (False, exc)
            raise
        self.done[key] = (True, value)
        return value


@pytest.fixture(scope="module")
def runner() -> Runner:
    return Runner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Once:
    """arch -> a tiny model folder with a ChatML template, its tokenizer trained on the task."""
    from alignkit.tasks.assist import AssistTask

    root = tmp_path_factory.mktemp("arch_models")
    corpus = list(AssistTask(max_operand=5).corpus())
    return Once(
        "building the tiny model",
        lambda arch: build_tiny_causal_lm(root / arch, corpus, TinyArchSpec(arch=arch)),
    )


@pytest.fixture(scope="module")
def pipeline(tiny_model: Once, runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> Once:
    """arch -> ``(run_dir, summary)`` of one ``stage=pipeline`` run, whose ``sft/`` and
    ``reward_model/`` every other test of that architecture starts from."""
    root = tmp_path_factory.mktemp("arch_pipelines")

    def run(arch: str) -> tuple[Path, dict[str, Any]]:
        run_dir = root / arch
        args = ["stage=pipeline", "model=hf", f"model.path={tiny_model(arch)}", *PIPELINE_BUDGET]
        return run_dir, runner(args, run_dir)

    return Once("the pipeline", run)


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------


def rows(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == stage]


def assert_finite(record: dict[str, Any], where: str) -> None:
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    assert not bad, f"{where}: non-finite metrics {bad}"


def load_policy(folder: Path, arch: str) -> Any:
    """The folder as ``AutoModelForCausalLM`` (with its tokenizer), checked for ``arch``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == arch
    assert AutoTokenizer.from_pretrained(folder).chat_template
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


def changed(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the parameters that differ between two models of the same architecture."""
    sb = b.state_dict()
    return [k for k, v in a.state_dict().items() if not torch.equal(v, sb[k])]


def check_reward_model(folder: Path, arch: str) -> None:
    """A sequence classifier of ``arch`` whose ``logits + reward_offset`` is alignkit's score."""
    from transformers import AutoModelForSequenceClassification

    from alignkit.rewards.learned import encode_parts, load_scorer

    rm, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert rm.config.model_type == arch and rm.config.num_labels == 1
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    scorer = load_scorer(folder)
    conv = [{"role": "user", "content": "Compute 2 plus 3."}]
    text = scorer.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    [(prompt, reply)] = encode_parts(scorer.tokenizer, [text], ["5"], 64, [conv])
    with torch.no_grad():
        logit = rm.eval()(input_ids=torch.tensor([prompt + reply])).logits[0, 0]
    want = scorer.score([text], ["5"], [conv])[0]
    assert float(logit) + rm.config.reward_offset == pytest.approx(float(want), abs=1e-4)


def check_eval(summary: dict[str, Any]) -> None:
    assert summary["win_rate_source"] == "gold"
    for key in ("win_rate", "gold_win_rate", "rm_win_rate"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["eval_prompts"] == 8.0
    assert math.isfinite(summary["kl_to_baseline"])


# --------------------------------------------------------------------------------------------
# 1. the pipeline and every RL algorithm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline(arch: str, pipeline: Once, tiny_model: Once) -> None:
    """SFT -> feedback -> reward model -> PPO -> eval: every stage's output is there and loads
    with its transformers Auto class, and every logged number is finite."""
    run_dir, summary = pipeline(arch)
    assert json.loads((run_dir / "summary.json").read_text())["stage"] == "pipeline"
    assert math.isfinite(summary["sft_loss"]) and summary["sft_examples"] == 200.0
    assert summary["feedback_prompts"] == 8.0 and summary["feedback_records"] >= 1
    assert (run_dir / "feedback" / "rankings.jsonl").is_file()
    assert summary["rm_steps"] == 6.0 and 0.0 <= summary["rm_heldout_accuracy"] <= 1.0
    # The default reward model: three members' weights averaged into one folder (WARM).
    assert "rm_member_2_heldout_accuracy" in summary
    assert not list((run_dir / "reward_model").glob("member_*"))
    assert math.isfinite(summary["rl_final/loss/policy"])
    check_eval(summary)
    for stage in ("sft", "reward_model", "rl"):
        records = rows(run_dir, stage)
        assert records, stage
        for record in records:
            assert_finite(record, stage)
    assert len(rows(run_dir, "rl")) == 2
    base = load_policy(tiny_model(arch), arch)
    sft = load_policy(run_dir / "sft", arch)
    rl = load_policy(run_dir / "rl" / "policy", arch)
    assert changed(sft, base) and changed(rl, sft)
    check_reward_model(run_dir / "reward_model", arch)


@pytest.mark.parametrize(("case", "overrides"), RL_CASES, ids=[c for c, _ in RL_CASES])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rl_algorithm(
    arch: str, case: str, overrides: list[str], pipeline: Once, runner: Runner, tmp_path: Path
) -> None:
    """Each algorithm a few steps from the architecture's SFT policy, rewarded by its reward
    model, then evaluated against the SFT policy."""
    from alignkit.cli.export import main as export

    source, _ = pipeline(arch)
    sft, rm = source / "sft", source / "reward_model"
    algo = overrides[0].removeprefix("algorithm=")
    args = [
        "stage=rl",
        "model=hf",
        f"model.path={sft}",
        f"reward.bradley_terry.path={rm}",
        *[o.format(rm=rm, feedback=source / "feedback") for o in overrides],
        *RL_BUDGET,
    ]
    summary = runner(args, tmp_path)
    records = rows(tmp_path, "rl")
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        assert_finite(record, case)
        assert any(k.startswith("loss/") for k in record), sorted(record)
        for key in ALGORITHM_LOSSES.get(algo, ("loss/policy",)):
            assert key in record, (key, sorted(record))
        if algo in OFFLINE:  # scored by nothing; its pairs' implicit rewards instead
            assert math.isfinite(record["pref/accuracy"]) and "reward/total" not in record
        else:
            assert math.isfinite(record["reward/bradley_terry"])
    assert summary["rl_final/response/length"] > 0  # offline: the last step's probe
    policy = load_policy(tmp_path / "rl" / "policy", arch)
    assert changed(policy, load_policy(sft, arch))
    if any(o.startswith("algorithm.value_model=") for o in overrides):
        # The learned critic exports to a sequence classifier of the same architecture.
        from transformers import AutoModelForSequenceClassification

        out = tmp_path / "critic"
        assert export([str(tmp_path / "rl" / "checkpoints"), str(out), "--kind", "critic"]) == 0
        critic = AutoModelForSequenceClassification.from_pretrained(out)
        assert critic.config.model_type == arch and critic.config.num_labels == 1
    evaluated = runner(
        [
            "stage=eval",
            "model=hf",
            f"model.path={sft}",
            f"eval.policy={tmp_path / 'rl' / 'policy'}",
            f"eval.baseline={sft}",
            f"eval.reward_model={rm}",
            *EVAL_BUDGET,
        ],
        tmp_path / "eval",
    )
    check_eval(evaluated)


# --------------------------------------------------------------------------------------------
# 2. LoRA on the default target modules
# --------------------------------------------------------------------------------------------


def _base_name(name: str) -> str:
    """A peft checkpoint key as the plain model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_default_targets(arch: str, pipeline: Once, runner: Runner, tmp_path: Path) -> None:
    """``model.lora.r`` with the default ``target_modules`` (all-linear) adapts every linear
    layer but the output head on this architecture; RL trains the adapters and nothing else;
    the merged policy and the exported checkpoint load as plain causal LMs."""
    from safetensors.torch import load_file
    from transformers.pytorch_utils import Conv1D

    from alignkit.cli.export import main as export

    source, _ = pipeline(arch)
    sft_dir, rm = source / "sft", source / "reward_model"
    args = [
        "stage=rl",
        "model=hf",
        f"model.path={sft_dir}",
        f"reward.bradley_terry.path={rm}",
        f"algorithm.value_model_path={rm}",
        f"model.lora.r={LORA_RANK}",
        "rl.optim.lr=1e-3",
        *RL_BUDGET,
    ]
    runner(args, tmp_path)
    for record in rows(tmp_path, "rl"):
        assert_finite(record, "lora")
    sft = load_policy(sft_dir, arch)
    base = sft.state_dict()
    head = sft.get_output_embeddings()
    linear = {
        name
        for name, m in sft.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and m is not head
    }

    # The checkpoint: adapters on every linear layer, base weights bitwise the SFT policy's.
    root = tmp_path / "rl" / "checkpoints"
    ckpt = load_file(root / (root / "latest").read_text().strip() / "model.safetensors")
    lora_b = {k: v for k, v in ckpt.items() if ".lora_B." in k}
    adapted = {_base_name(k).split(".lora_B.")[0] for k in lora_b}
    assert adapted == linear, sorted(adapted ^ linear)
    assert any(v.abs().max() > 0 for v in lora_b.values())  # B starts at 0: trained
    for key, value in ckpt.items():
        if ".lora_" not in key:
            assert torch.equal(value, base[_base_name(key)]), key

    # The merged policy: W + (alpha / r) B A on the adapted layers, the rest untouched.
    merged = load_policy(tmp_path / "rl" / "policy", arch)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged_sd = merged.state_dict()
    moved = 0
    for name, value in merged_sd.items():
        module = name.rsplit(".", 1)[0]
        if module in linear and name.endswith(".weight"):
            delta = (value - base[name]).double()
            s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
            # Rank <= r up to float32 rounding of W + dW (measured: s[r] / s[0] < 2e-7).
            assert s[LORA_RANK:].max() <= 1e-5 * s[0], (name, s[: LORA_RANK + 2])
            moved += bool(s[0] > 0)
        else:
            assert torch.equal(value, base[name]), name
    assert moved

    out = tmp_path / "exported"
    assert export([str(root), str(out)]) == 0
    exported = load_policy(out, arch).state_dict()
    for name, value in merged_sd.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------
# 3. FSDP on two gloo ranks
# --------------------------------------------------------------------------------------------


def _fsdp_args(case: str, sft: Path, rm: Path) -> list[str]:
    return [
        "stage=rl",
        "model=hf",
        f"model.path={sft}",
        f"reward.bradley_terry.path={rm}",
        *[o.format(rm=rm) for o in FSDP_CASES[case]],
        *RL_BUDGET,
    ]


@pytest.fixture(scope="module")
def fsdp_runs(pipeline: Once, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch (2 gloo ranks) running every FSDP case of every architecture
    whose pipeline succeeded; ``{"<arch>-<case>": run_dir, "log": launcher output}``."""
    root = tmp_path_factory.mktemp("arch_fsdp")
    runs, out = [], {}
    for arch in ARCHITECTURES:
        try:
            source, _ = pipeline(arch)
        except BaseException:  # that architecture's test_pipeline reports it
            continue
        for case in FSDP_CASES:
            run_dir = root / f"{arch}-{case}"
            args = _fsdp_args(case, source / "sft", source / "reward_model")
            runs.append(
                {"run_dir": str(run_dir), "overrides": ["logger=none", *args, "backend=fsdp"]}
            )
            out[f"{arch}-{case}"] = run_dir
    out["log"] = launch_on_two_ranks(runs, root)
    return out


def launch_on_two_ranks(runs: list[dict[str, Any]], root: Path) -> str:
    """Every ``{"run_dir", "overrides"}`` run in one torchrun launch of 2 gloo ranks
    (tests/arch_matrix_fsdp.py); returns the launcher's exit code and the end of its log."""
    spec = root / "runs.json"
    spec.write_text(json.dumps(runs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(REPO / "tests" / "arch_matrix_fsdp.py"), str(spec)]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    return f"exit {proc.returncode}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("case", list(FSDP_CASES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fsdp_two_ranks_match_one_process(
    arch: str, case: str, pipeline: Once, fsdp_runs: dict[str, Any], runner: Runner, tmp_path: Path
) -> None:
    """``backend=fsdp`` on 2 ranks and one process on the same global batch: the same metrics
    every step, the same final weights, and a sharded checkpoint that exports to them."""
    from safetensors.torch import load_file

    from alignkit.cli.export import main as export

    source, _ = pipeline(arch)
    run_dir = fsdp_runs.get(f"{arch}-{case}")
    assert run_dir is not None, fsdp_runs["log"]
    errors = sorted(run_dir.glob("error_rank*.txt"))
    assert not errors, errors[0].read_text()[-4000:]
    assert (run_dir / "metrics.jsonl").is_file(), fsdp_runs["log"]
    runner(_fsdp_args(case, source / "sft", source / "reward_model"), tmp_path)
    got, want = rows(run_dir, "rl"), rows(tmp_path, "rl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1]
    for g, w in zip(got, want, strict=True):
        # Data parallel: each rank trained on half of the batch's rows.
        assert g.pop("update/rows") * 2 == w.pop("update/rows") == 8.0
        # A clip fraction counts tokens past a boundary: a ratio or value sitting on it may
        # fall either side under float sums in another order (1 token of 56 was seen).
        for key in [k for k in w if k.endswith("clipfrac")]:
            assert abs(g.pop(key) - w.pop(key)) <= 0.05, key
        keys = sorted(k for k, v in w.items() if isinstance(v, float) and "time/" not in k)
        assert keys == sorted(k for k, v in g.items() if isinstance(v, float) and "time/" not in k)
        torch.testing.assert_close(
            torch.tensor([g[k] for k in keys], dtype=torch.float64),
            torch.tensor([w[k] for k in keys], dtype=torch.float64),
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, keys=keys, g=g, w=w: (
                m + "\n" + "\n".join(f"{k}: {g[k]} vs {w[k]}" for k in keys if g[k] != w[k])
            ),
        )
    a = load_file(run_dir / "rl" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "rl" / "policy" / "model.safetensors")
    assert_weights_close(a, b, adam_steps=4)
    ckpt_root = run_dir / "rl" / "checkpoints"
    ckpt = ckpt_root / (ckpt_root / "latest").read_text().strip()
    assert (ckpt / "dcp" / ".metadata").is_file()
    out = tmp_path / "exported"
    assert export([str(ckpt_root), str(out)]) == 0
    # Loaded models compared, not files: transformers renames some keys on load (GPT-NeoX's
    # embed_out is lm_head in transformers 5).
    exported = load_policy(out, arch)
    assert not changed(exported, load_policy(run_dir / "rl" / "policy", arch))


# --------------------------------------------------------------------------------------------
# 4. log-probs while sampling = log-probs of a forward
# --------------------------------------------------------------------------------------------

TEMPERATURE = 0.8
QUESTIONS = [
    "Compute 2 plus 3.",
    "Write the word dog in capital letters, and say nothing else at all, please.",
    "Hi",
    "Repeat the word ring three times, slowly.",
]


@pytest.fixture(scope="module")
def peaked_model(tiny_model: Once) -> Once:
    """arch -> (model, tokenizer): the tiny model with seeded noise on every weight, so its
    next-token distributions are far from uniform and a wrong log-prob cannot hide in them."""
    from alignkit.models import load_causal_lm

    def load(arch: str) -> tuple[Any, Any]:
        model, tok = load_causal_lm(str(tiny_model(arch)))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        return model.eval(), tok

    return Once("loading the model", load)


def _sample(model: Any, tok: Any, ids: Any, mask: Any, stops: list[int], lean: bool) -> Any:
    from alignkit.models.generation import generate

    return generate(
        model,
        ids,
        mask,
        max_new_tokens=10,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
        temperature=TEMPERATURE,
        generator=torch.Generator().manual_seed(1),
        lean=lean,
    )


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "plain"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sampling_logprobs_equal_a_forward(arch: str, lean: bool, peaked_model: Once) -> None:
    """``generate``'s recorded log-probs (softmax(logits / τ), left-padded prompts of
    different lengths, rows ending at different steps) equal ``sequence_logprobs`` on the
    padded ``prompt | response`` batch, ``response_logprobs``, and the model's own forward of
    each row alone and unpadded (a plain ``model(input_ids, attention_mask)`` call: without
    padding, the default positions are the right ones for absolute embeddings too)."""
    from alignkit.data.chat import PromptFormat
    from alignkit.models import response_logprobs, sequence_logprobs
    from alignkit.models.generation import pad_prompts

    model, tok = peaked_model(arch)
    fmt = PromptFormat(tok, "auto", model=model)
    prompts = [fmt.prompt_text([{"role": "user", "content": q}]) for q in QUESTIONS]
    ids, mask = pad_prompts(tok, [tok(p, add_special_tokens=False)["input_ids"] for p in prompts])
    assert len(set(mask.sum(1).tolist())) == len(QUESTIONS)  # every row padded differently
    # The stop token: what row 0 samples third. The same seed samples the same tokens again
    # until a row stops, so row 0 ends there and the batch gets ragged responses.
    first = _sample(model, tok, ids, mask, [tok.eos_token_id], lean)
    stops = [int(first.response_ids[0, 2]), tok.eos_token_id]
    gen = _sample(model, tok, ids, mask, stops, lean)
    resp, resp_mask = gen.response_ids, gen.response_mask
    assert gen.finished[0] and resp_mask[0].sum() <= 3
    assert gen.logprobs is not None
    recorded = gen.logprobs
    assert recorded[resp_mask == 0].eq(0).all()
    valid = recorded[resp_mask == 1]
    assert valid.std() > 0.1, "near-uniform distributions: the check would prove little"

    seq, seq_mask = torch.cat([ids, resp], 1), torch.cat([mask, resp_mask], 1)
    with torch.no_grad():
        padded = sequence_logprobs(model, seq, seq_mask, ids.shape[1], temperature=TEMPERATURE)
        packed = response_logprobs(model, ids, mask, resp, resp_mask, temperature=TEMPERATURE)
        plain = torch.zeros_like(recorded)
        for i in range(len(QUESTIONS)):
            row = seq[i][seq_mask[i] == 1][None]
            p_len, r_len = int(mask[i].sum()), int(resp_mask[i].sum())
            logits = model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0]
            logp = torch.log_softmax(logits.float() / TEMPERATURE, -1)
            steps = torch.arange(p_len - 1, p_len - 1 + r_len)
            plain[i, :r_len] = logp[steps, row[0, p_len : p_len + r_len]]
    for name, want in (("sequence_logprobs", padded), ("response_logprobs", packed)):
        torch.testing.assert_close(recorded, want, rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(recorded, plain, rtol=0, atol=1e-5, msg="HF forward")


# --------------------------------------------------------------------------------------------
# the built-in model in another architecture: model.tiny.arch
# --------------------------------------------------------------------------------------------


def test_the_built_in_model_in_another_architecture(runner: Runner, tmp_path: Path) -> None:
    """``model.tiny.arch=qwen2`` builds the task's base model as a Qwen2 of the configured
    shape (gated MLP at GPT-2's parameter count), which SFT then trains."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.errors import ConfigError

    shape = ["model.tiny.n_layer=2", "model.tiny.n_embd=96", "model.tiny.n_head=3"]
    args = ["stage=sft", "model.tiny.arch=qwen2", *shape, "sft.steps=2", "sft.batch_size=4"]
    runner(args, tmp_path / "qwen2")
    config = AutoConfig.from_pretrained(tmp_path / "qwen2" / "base_model")
    assert config.model_type == "qwen2"
    # 8/3 * 96 = 256: three gated matrices of 96 x 256 hold what GPT-2's two of 96 x 384 do.
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 96, 256)
    assert config.num_key_value_heads == 3
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2" / "sft")
    assert sft.config.model_type == "qwen2"
    assert all(torch.isfinite(p).all() for p in sft.parameters())
    with pytest.raises(ConfigError, match=r"model\.tiny\.arch.*'opt'"):
        runner(["stage=sft", "model.tiny.arch=opt"], tmp_path / "opt")
