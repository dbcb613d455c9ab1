"""Training-inference mismatch correction (alignkit.rollout.mismatch) and the rollout-engine
seam, against hand-computed values; an engine whose log-probs differ from the trainer's by a
known amount drives a real GRPO step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.errors import ConfigError, HookError
from alignkit.rollout import (
    IS_WEIGHTS,
    MismatchCorrection,
    NativeEngine,
    correction_weights,
    mismatch_metrics,
)
from alignkit.tracking import read_metrics

LN2 = math.log(2.0)


def _logprobs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two responses: token weights w = pi_old / mu of 1, 2, 4 | 0.5, 1, (pad)."""
    mu = torch.full((2, 3), -1.0)
    log_w = torch.tensor([[0.0, LN2, 2 * LN2], [-LN2, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return mu + log_w, mu, mask


def test_truncated_importance_weights_are_capped() -> None:
    trainer, engine, mask = _logprobs()
    w = correction_weights(trainer, engine, mask, MismatchCorrection(("tis",), tis_cap=2.0))
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 2.0], [0.5, 1.0, 0.0]]))


def test_masked_importance_sampling_drops_tokens_outside_the_band() -> None:
    trainer, engine, mask = _logprobs()
    corr = MismatchCorrection(("mis",), mis_low=0.6, mis_high=3.0)
    w = correction_weights(trainer, engine, mask, corr)
    # 4 > 3 and 0.5 < 0.6 are masked; padding stays 0.
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))


def test_geometric_mean_sequence_mask() -> None:
    trainer, engine, mask = _logprobs()
    # Row 0: geometric mean (1 * 2 * 4)^(1/3) = 2; row 1: (0.5 * 1)^(1/2) = 0.707.
    corr = MismatchCorrection(("seq_mask",), seq_low=0.7, seq_high=1.9)
    w = correction_weights(trainer, engine, mask, corr)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
    both = MismatchCorrection(("tis", "seq_mask"), tis_cap=3.0, seq_low=0.5, seq_high=2.5)
    w = correction_weights(trainer, engine, mask, both)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 0.0]]))


def test_metrics_by_hand() -> None:
    trainer, engine, mask = _logprobs()
    weights = correction_weights(trainer, engine, mask, MismatchCorrection(("tis",), 2.0))
    m = mismatch_metrics(trainer, engine, mask, weights)
    w = torch.tensor([1.0, 2.0, 4.0, 0.5, 1.0])
    kl = float((w - 1 - w.log()).mean())  # k3 of KL(mu || pi_old)
    assert m["mismatch/kl"] == pytest.approx(kl)
    assert m["mismatch/weight_max"] == pytest.approx(4.0)
    assert m["mismatch/weight_mean"] == pytest.approx(8.5 / 5)
    assert m["mismatch/masked_frac"] == 0.0
    c = torch.tensor([1.0, 2.0, 2.0, 0.5, 1.0])
    assert m["mismatch/ess"] == pytest.approx(float(c.sum() ** 2 / (5 * (c**2).sum())))


def test_the_correction_is_the_identity_when_the_engines_agree() -> None:
    logp = -torch.rand(3, 4) * 3
    mask = torch.ones(3, 4)
    for parts in (("tis",), ("mis",), ("seq_mask",), ("tis", "mis", "seq_mask")):
        w = correction_weights(logp, logp.clone(), mask, MismatchCorrection(parts))
        assert torch.equal(w, torch.ones(3, 4))
    m = mismatch_metrics(logp, logp.clone(), mask, None)
    assert m["mismatch/kl"] == 0.0 and m["mismatch/ess"] == pytest.approx(1.0)
    assert m["mismatch/weight_max"] == m["mismatch/weight_mean"] == 1.0


def test_correction_config() -> None:
    node = OmegaConf.create({"correction": "auto", "tis_cap": 3.0})
    assert MismatchCorrection.from_config(node, engine_is_trainer=True) is None
    auto = MismatchCorrection.from_config(node, engine_is_trainer=False)
    assert auto is not None and auto.parts == ("tis",) and auto.tis_cap == 3.0
    combo = MismatchCorrection.from_config(
        OmegaConf.create({"correction": "mis+seq_mask"}), engine_is_trainer=False
    )
    assert combo is not None and combo.parts == ("mis", "seq_mask")
    none = OmegaConf.create({"correction": "none"})
    assert MismatchCorrection.from_config(none, engine_is_trainer=False) is None
    with pytest.raises(ConfigError, match="unknown part 'tis2'"):
        MismatchCorrection(("tis2",))
    with pytest.raises(ConfigError, match=r"rollout\.mis_low=1\.5"):
        MismatchCorrection(("mis",), mis_low=1.5)
    with pytest.raises(ConfigError, match="tis_cap"):
        MismatchCorrection(("tis",), tis_cap=0.5)


def test_policy_loss_weights_each_token_by_its_correction() -> None:
    from alignkit.batch import Rollout
    from alignkit.rl.update import Counts, PolicyLossSpec, policy_loss

    mask = torch.ones(1, 2)
    batch = Rollout(
        prompt_ids=torch.zeros(1, 1, dtype=torch.long),
        prompt_mask=torch.ones(1, 1, dtype=torch.long),
        response_ids=torch.zeros(1, 2, dtype=torch.long),
        response_mask=mask,
        group_ids=torch.zeros(1, dtype=torch.long),
        prompts=["p"],
        responses=["r"],
        records=[None],
        logprobs=torch.zeros(1, 2),
    )
    batch.advantages = torch.tensor([[1.0, 1.0]])
    counts = Counts(num_tokens=2.0, num_seqs=1, max_len=2)
    logp = torch.zeros(1, 2, requires_grad=True)
    rows = torch.tensor([0])
    plain, _ = policy_loss(batch, rows, counts, logp, torch.zeros(1, 2), PolicyLossSpec())
    batch.extras[IS_WEIGHTS] = torch.tensor([[2.0, 0.0]])
    weighted, _ = policy_loss(batch, rows, counts, logp, torch.zeros(1, 2), PolicyLossSpec())
    # ratio 1: per-token loss -A = -1; token mean of (-1 * 2, -1 * 0) = -1 vs -1 unweighted.
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-1.0)
    (grad,) = torch.autograd.grad(weighted, logp)
    # d/dlogp of -A * rho * w / 2: only the first token trains, with twice the weight.
    torch.testing.assert_close(grad, torch.tensor([[-1.0, 0.0]]))


class _ShiftedEngine(NativeEngine):
    """The native sampler reporting log-probs off by a known log-weight per token."""

    trainer_logprobs = False
    shift = 0.3  # log mu = log pi_old - 0.3: every weight is e^0.3 = 1.35

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        out = super().generate(*args, **kwargs)
        assert out.logprobs is not None
        out.logprobs = (out.logprobs - self.shift) * out.response_mask
        return out


def test_a_mismatched_engine_drives_a_corrected_grpo_step(sft_run: Path, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    from alignkit.cli import registration, run_stage

    manager, registry = registration()
    registry.add("rollout_engine", "shifted", _ShiftedEngine)
    overrides = [
        "stage=rl",
        "algorithm=grpo",
        "experiment=smoke",
        "reward=[gold]",
        "logger=none",
        "rl.steps=1",
        "rollout.name=shifted",
        "rollout.correction=tis+mis",
        "rollout.tis_cap=1.2",
        "rollout.mis_high=1.3",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path}",
    ]
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    run_stage(cfg, tmp_path, manager, registry)
    (m,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    w = math.exp(_ShiftedEngine.shift)
    # The trainer's own log-probs replaced the engine's: the update's ratio starts at 1.
    assert m["kl/approx"] == pytest.approx(0.0, abs=1e-6)
    assert m["mismatch/weight_max"] == pytest.approx(w, rel=1e-4)
    assert m["mismatch/weight_mean"] == pytest.approx(w, rel=1e-4)
    assert m["mismatch/kl"] == pytest.approx(w - 1 - 0.3, rel=1e-3)
    # mis_high = 1.3 < 1.35 masks every token.
    assert m["mismatch/masked_frac"] == 1.0


def test_rollout_vllm_without_vllm_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from alignkit_plugins.vllm_rollout import build_vllm_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vLLM is not installed
    ctx = type("Ctx", (), {})()
    ctx.cfg = OmegaConf.create({"rollout": {"name": "vllm", "mode": "colocate"}})
    with pytest.raises(ConfigError, match="rollout=vllm needs vLLM"):
        build_vllm_engine(ctx)


class _FailingEngine(NativeEngine):
    """An engine that holds a resource and fails mid-run."""

    closed: ClassVar[list[bool]] = []

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine failure")

    def close(self) -> None:
        _FailingEngine.closed.append(True)


def _run(overrides: list[str], tmp_path: Path, engines: dict[str, Any]) -> None:
    from hydra import compose, initialize_config_module

    from alignkit.cli import registration, run_stage

    manager, registry = registration()
    for name, factory in engines.items():
        registry.add("rollout_engine", name, factory)
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"run_dir={tmp_path}"])
    run_stage(cfg, tmp_path, manager, registry)


def test_a_failed_run_closes_its_rollout_engine(sft_run: Path, tmp_path: Path) -> None:
    overrides = ["stage=rl", "algorithm=grpo", "experiment=smoke", "reward=[gold]"]
    overrides += ["logger=none", "rollout.name=failing", f"model.path={sft_run / 'sft'}"]
    _FailingEngine.closed.clear()
    with pytest.raises(HookError, match="engine failure"):
        _run(overrides, tmp_path, {"failing": _FailingEngine})
    assert _FailingEngine.closed == [True]


def test_reinforce_weighs_its_tokens_by_the_correction(sft_run: Path, tmp_path: Path) -> None:
    """algorithm=reinforce writes its own update: it applies the weights too. Every token
    masked (mis_high below the shifted engine's weight) leaves nothing to train on."""
    overrides = ["stage=rl", "algorithm=reinforce", "experiment=smoke", "reward=[gold]"]
    overrides += ["logger=none", "rl.steps=1", "rollout.name=shifted", "rollout.correction=mis"]
    overrides += ["rollout.mis_high=1.3", f"model.path={sft_run / 'sft'}"]
    _run(overrides, tmp_path, {"shifted": _ShiftedEngine})
    (m,) = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "rl"]
    assert m["mismatch/masked_frac"] == 1.0
    assert m["loss/policy"] == 0.0 and m["policy/grad_norm"] == 0.0


def test_vllm_engine_helpers() -> None:
    """The parts of the vLLM engine that need no vLLM: seeds, arguments, outputs, the
    server's environment."""
    from alignkit.rollout import vllm_engine as ve

    assert ve.row_seed(0, 3, 5) == ve.row_seed(0, 3, 5) != ve.row_seed(0, 3, 6)
    assert ve.row_seed(1, 3, 5) != ve.row_seed(0, 3, 5) and 0 <= ve.row_seed(0, 0, 0) < 2**31
    node = OmegaConf.create({"dtype": "auto", "kv_cache_memory_mb": None})
    cpu = ve.engine_kwargs(node, "/m", torch.device("cpu"), 128, 7)
    assert cpu["dtype"] == "float32" and cpu["enforce_eager"] is True
    assert cpu["kv_cache_memory_bytes"] == ve.CPU_KV_CACHE_MB << 20
    assert cpu["load_format"] == "dummy" and cpu["logprobs_mode"] == "processed_logprobs"
    gpu = ve.engine_kwargs(node, "/m", torch.device("cuda", 0), 128, 7)
    assert gpu["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in gpu
    assert gpu["enforce_eager"] is False and gpu["dtype"] == "auto"
    out = ve.to_generation_output(
        [
            {"tokens": [5, 6, 2], "logprobs": [-1.0, -2.0, -0.5], "finished": True},
            {"tokens": [7], "logprobs": [-3.0], "finished": False},
        ],
        pad_token_id=0,
        device=torch.device("cpu"),
    )
    assert out.response_ids.tolist() == [[5, 6, 2], [7, 0, 0]]
    assert out.response_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out.logprobs is not None and out.logprobs.tolist() == [[-1, -2, -0.5], [-3, 0, 0]]
    assert out.finished.tolist() == [True, False]


def test_the_server_does_not_inherit_the_trainers_rendezvous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alignkit.rollout import vllm_engine as ve

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    env = ve._server_env()
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"} & set(
        env
    )
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


def test_each_vllm_call_of_a_step_draws_with_its_own_seeds() -> None:
    """A second rollout call in a step (a greedy baseline, a refill) must not reuse the first
    call's seeds; the first call of every step keeps the seeds of the global rows."""
    from types import SimpleNamespace

    from alignkit.rollout import vllm_engine as ve

    class Client:
        def __init__(self) -> None:
            self.seeds: list[list[int]] = []

        def generate(self, prompts: Any, seeds: list[int], params: Any) -> list[dict]:
            self.seeds.append(list(seeds))
            return [{"tokens": [1], "logprobs": [-1.0], "finished": True} for _ in prompts]

    cfg = OmegaConf.create(
        {
            "seed": 3,
            "rollout": {"mode": "colocate"},
            "rl": {"temperature": 1.0, "max_new_tokens": 2, "top_k": 0, "top_p": 1.0},
        }
    )
    ctx = SimpleNamespace(cfg=cfg, step=0, tokenizer=SimpleNamespace(pad_token_id=0))
    engine = ve.VLLMEngine(ctx)  # type: ignore[arg-type]
    engine.client, engine.synced_step = Client(), 0
    ids, mask = torch.ones(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long)
    for _ in range(2):
        engine.generate(ctx, ids, mask, [1], (2, 4))  # type: ignore[arg-type]
    ctx.step = engine.synced_step = 1
    engine.generate(ctx, ids, mask, [1], (2, 4))  # type: ignore[arg-type]
    first, second, next_step = engine.client.seeds
    assert first == [ve.row_seed(3, 0, 2), ve.row_seed(3, 0, 3)]  # this rank's global rows
    assert second == [ve.row_seed(3, 0, 6), ve.row_seed(3, 0, 7)]  # after all 4 rows of call 1
    assert next_step == [ve.row_seed(3, 1, 2), ve.row_seed(3, 1, 3)]
