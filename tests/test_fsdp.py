"""backend=fsdp on 2 CPU ranks (gloo) against one process on the same global batch.

Sampling does not depend on the number of ranks (every rank draws the global batch's
numbers and uses its own rows'), so both runs sample the same responses, and what is compared
is everything the backend changes: sharded prompts, collective generation, rewards scored per
rank, the gathered global batch, the update split over ranks, gradient reduction and the
sharded optimizer step. Tolerance: 1e-5 relative (float32 sums taken in a
different order on sharded tensors; the measured gap is ~1e-7).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from alignkit.models import is_scalar_head_folder
from alignkit.tracking import read_metrics
from tests.conftest import REPO, cli_env, run_cli

RTOL, ATOL = 1e-5, 1e-6
RL = [
    "stage=rl",
    "experiment=smoke",
    "algorithm=reinforce",
    "reward=[gold]",
    "logger=none",
    "rl.steps=3",
]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300) -> str:
    """``torchrun --standalone --nproc_per_node=N -m alignkit.cli ARGS``; returns stderr."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "-m", "alignkit.cli", *args]
    proc = subprocess.run(
        cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _series(run_dir: Path, stage: str, keys: list[str]) -> dict[str, list[float]]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == stage]
    return {k: [r[k] for r in rows if k in r] for k in keys}


@pytest.fixture(scope="module")
def fsdp_rl(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp_rl")
    run_torchrun([*RL, f"model.path={sft_run / 'sft'}", "backend=fsdp", f"run_dir={run_dir}"])
    return run_dir


def test_rl_losses_on_two_ranks_match_one_process(
    fsdp_rl: Path, sft_run: Path, tmp_path: Path
) -> None:
    single = run_cli([*RL, f"model.path={sft_run / 'sft'}", f"run_dir={tmp_path}"])
    assert single.returncode == 0, single.stderr[-3000:]
    keys = ["loss/policy", "policy/grad_norm", "reward/total", "response/length", "kl/ref"]
    got, want = _series(fsdp_rl, "rl", keys), _series(tmp_path, "rl", keys)
    assert len(want["loss/policy"]) == 3
    for key in keys:
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(want[key]), rtol=RTOL, atol=ATOL, msg=key
        )
    # Learning happened (the comparison is not of constants): the loss moves between steps.
    assert len(set(want["loss/policy"])) == 3
    # Rank 0 alone wrote metrics: one record per step, not one per rank.
    assert [r["step"] for r in read_metrics(fsdp_rl / "metrics.jsonl")] == [0, 1, 2]
    # The final weights agree too, to 2e-5 absolute (measured 4e-6), except the attention
    # key biases: their exact gradient is 0 (softmax ignores a per-query constant), so Adam,
    # dividing by sqrt(v), turns rounding noise into a step of up to lr = 1e-4, and the two
    # runs' noise differs (one process uses the fused AdamW kernel, FSDP's sharded parameters
    # the foreach one). Those get the bound of 3 such steps.
    from safetensors.torch import load_file

    a = load_file(fsdp_rl / "rl" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "rl" / "policy" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attn.c_attn.bias"):
            q, k, v = a[name].chunk(3)
            q_want, k_want, v_want = b[name].chunk(3)
            torch.testing.assert_close(k, k_want, rtol=0, atol=3e-4, msg=name)
            a[name], b[name] = torch.cat([q, v]), torch.cat([q_want, v_want])
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=2e-5, msg=name)


def test_fsdp_checkpoint_is_sharded_and_exports_to_a_loadable_hf_folder(
    fsdp_rl: Path, tmp_path: Path
) -> None:
    root = fsdp_rl / "rl" / "checkpoints"
    ckpt = root / (root / "latest").read_text().strip()
    assert ckpt.name == "step_000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert not list(root.glob(".*.tmp"))  # no temporary directory left behind

    out = tmp_path / "exported"
    proc = run_cli(["export", str(root), str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models.generation import decode_responses, generate, tokenize_prompts

    exported = load_file(out / "model.safetensors")
    final = load_file(fsdp_rl / "rl" / "policy" / "model.safetensors")
    # The last checkpoint is the final policy: bitwise the same weights.
    assert all(torch.equal(exported[k], final[k]) for k in final)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids, mask = tokenize_prompts(tok, ["User: What is 2 + 3?\nAssistant:"])
    gen = generate(
        model,
        ids,
        mask,
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        greedy=True,
    )
    text = decode_responses(tok, gen.response_ids, gen.response_mask)[0]
    assert gen.response_ids.shape[1] >= 1 and isinstance(text, str)


@pytest.mark.slow  # ~30 s: one more 2-rank launch
def test_fsdp_resume_from_a_sharded_checkpoint_continues_the_same_trajectory(
    fsdp_rl: Path, sft_run: Path, tmp_path: Path
) -> None:
    """A crash right after the step-2 checkpoint, simulated on a copy of the 3-step run."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_rl, run_dir)
    root = run_dir / "rl" / "checkpoints"
    shutil.rmtree(root / "step_000003")
    shutil.rmtree(run_dir / "rl" / "policy")
    (root / "latest").write_text("step_000002\n")
    resume = [*RL, f"model.path={sft_run / 'sft'}", "backend=fsdp", "rl.resume=true"]
    stderr = run_torchrun([*resume, f"run_dir={run_dir}"])
    assert "resumed from" in stderr and "at step 2" in stderr
    got, want = read_metrics(run_dir / "metrics.jsonl"), read_metrics(fsdp_rl / "metrics.jsonl")
    assert [r["step"] for r in got] == [0, 1, 2]  # step 2's old record was replaced
    # Sharded weights, optimizer state and every rank's RNG restored: bitwise the same.
    assert [_untimed(r) for r in got] == [_untimed(r) for r in want]
    from safetensors.torch import load_file

    a = load_file(run_dir / "rl" / "policy" / "model.safetensors")
    b = load_file(fsdp_rl / "rl" / "policy" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_export_refuses_a_directory_that_is_not_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from alignkit.cli.export import main

    assert main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a complete alignkit checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def feedback(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """64 pairwise comparisons and a 2-layer backbone (from the reward-model tests)."""
    from alignkit.data.feedback import write_feedback_jsonl
    from alignkit.models import TinyModelSpec, build_tiny_model
    from tests.test_reward_models import FILLER, PROMPTS, synthetic_feedback

    folder = tmp_path_factory.mktemp("rm_fsdp")
    data = write_feedback_jsonl(folder / "pairs.jsonl", synthetic_feedback("pairwise", 64, 0))
    corpus = [*PROMPTS, *FILLER, "great awful", "User: Assistant:"] * 3
    spec = TinyModelSpec(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=48)
    return Path(data), build_tiny_model(folder / "backbone", corpus, spec)


@pytest.mark.slow  # ~45 s: a 2-rank launch and a single-process run
def test_reward_model_losses_on_two_ranks_match_one_process(
    feedback: tuple[Path, Path], tmp_path: Path
) -> None:
    data, backbone = feedback
    args = [
        "stage=reward_model",
        "model=nano",
        "logger=none",
        f"reward_model.data=[{data}]",
        f"reward_model.backbone={backbone}",
        "reward_model.steps=4",
        "reward_model.batch_size=8",  # 4 pairs per rank: equal shares, so exact equivalence
        "reward_model.log_every=1",
        "reward_model.max_length=48",
        "reward_model.ensemble_size=1",
    ]
    run_torchrun([*args, "backend=fsdp", f"run_dir={tmp_path / 'fsdp'}"])
    single = run_cli([*args, f"run_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    keys = ["loss", "grad_norm", "accuracy"]
    got = _series(tmp_path / "fsdp", "reward_model", keys)
    want = _series(tmp_path / "one", "reward_model", keys)
    assert len(want["loss"]) == 4
    for key in keys:
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(want[key]), rtol=RTOL, atol=ATOL, msg=key
        )
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    reference = json.loads((tmp_path / "one" / "summary.json").read_text())
    # One process scores with the lean last-token forward and steps the fused AdamW; the
    # sharded model runs its own forward and the foreach AdamW: equal to float rounding per
    # step, which four training steps and a mean over a few hundred scores grow to ~1e-5.
    for key in ("rm_heldout_accuracy", "rm_norm_mean", "rm_norm_std"):
        assert summary[key] == pytest.approx(reference[key], rel=1e-4, abs=ATOL), key
    # The gathered model was saved by rank 0 as a plain folder with its scalar head.
    assert is_scalar_head_folder(tmp_path / "fsdp" / "reward_model")


@pytest.mark.slow  # ~60 s: a 2-rank launch and a single-process run
def test_averaged_reward_models_on_two_ranks_match_one_process(
    feedback: tuple[Path, Path], tmp_path: Path
) -> None:
    """The default ensemble (``merge=average``) under FSDP: each rank averages its own shards
    of the members, and the saved model is the one a single process averages."""
    from safetensors.torch import load_file

    data, backbone = feedback
    args = [
        "stage=reward_model",
        "model=nano",
        "logger=none",
        f"reward_model.data=[{data}]",
        f"reward_model.backbone={backbone}",
        "reward_model.steps=3",
        "reward_model.batch_size=8",
        "reward_model.max_length=48",
        "reward_model.ensemble_size=2",
        "reward_model.merge=average",
    ]
    run_torchrun([*args, "backend=fsdp", f"run_dir={tmp_path / 'fsdp'}"])
    single = run_cli([*args, f"run_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    a = load_file(tmp_path / "fsdp" / "reward_model" / "model.safetensors")
    b = load_file(tmp_path / "one" / "reward_model" / "model.safetensors")
    assert a.keys() == b.keys()
    # Three steps of two members in the sharded forward and the foreach AdamW against the
    # lean forward and the fused one: float rounding, ~2e-4 at most in the head (which the
    # normalisation also rescales), far below the members' spread the averaging removes.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=3e-4, msg=name)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert {"rm_member_0_heldout_accuracy", "rm_member_1_heldout_accuracy"} <= set(summary)


@pytest.mark.slow  # ~35 s: a 2-rank launch and a single-process run
def test_sft_losses_on_two_ranks_match_one_process(tmp_path: Path) -> None:
    """SFT normalises by the global token count: the 2-rank loss is the global token mean."""
    args = [
        "stage=sft",
        "experiment=smoke",
        "logger=none",
        "sft.steps=4",
        "sft.log_every=1",
        "eval.num_prompts=8",
        "task.demonstrations=200",
    ]
    run_torchrun([*args, "backend=fsdp", f"run_dir={tmp_path / 'fsdp'}"])
    single = run_cli([*args, f"run_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    keys = ["loss", "grad_norm", "lr"]
    got, want = _series(tmp_path / "fsdp", "sft", keys), _series(tmp_path / "one", "sft", keys)
    assert len(want["loss"]) == 4 and len(set(want["loss"])) == 4
    for key in keys:
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(want[key]), rtol=RTOL, atol=ATOL, msg=key
        )
    # Rank 0 gathered the shards into a plain HF folder.
    assert (tmp_path / "fsdp" / "sft" / "model.safetensors").is_file()


@pytest.mark.slow  # ~60 s each: two 2-rank launches
@pytest.mark.parametrize("epochs", [2, 1], ids=["two-forwards", "critic-steps-once"])
def test_ppo_critic_is_sharded_checkpointed_and_resumed(
    sft_run: Path, tmp_path: Path, epochs: int
) -> None:
    """PPO's separate critic under FSDP: built from the sharded policy, saved by every rank
    into the checkpoint's ``value_model/`` shards, and restored when the run resumes. With one
    epoch (one optimizer step per batch) the critic learns in the advantage phase
    (``algorithm.value_forward_once``), on every rank alike."""
    args = [
        "stage=rl",
        "experiment=smoke",
        "algorithm=ppo",
        f"algorithm.ppo_epochs={epochs}",
        "reward=[gold]",
        "logger=none",
        "backend=fsdp",
        "rl.checkpoint_every=1",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path}",
    ]
    run_torchrun([*args, "rl.steps=2"])
    critic = tmp_path / "rl" / "checkpoints" / "step_000002" / "value_model"
    assert (critic / "dcp").is_dir()
    log = run_torchrun([*args, "rl.steps=3", "rl.resume=true"])
    assert "resumed from" in log and "at step 2" in log
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "step" in r]
    assert steps == [0, 1, 2]
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert "value/explained_variance" in last
    assert last["value/grad_norm"] > 0 and math.isfinite(last["loss/value"])


def _untimed(record: dict) -> dict:
    """A metrics record without its wall-clock times (``time/...``), which differ run to run."""
    return {k: v for k, v in record.items() if not k.startswith("time/")}
