"""Backends: selection, sharding, batch merging, RNG state, and the CUDA paths (GPU only)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from alignkit.backends import BACKENDS, Backend, CPUBackend, build_backend, shard_bounds
from alignkit.backends.fsdp import transformer_blocks
from alignkit.batch import Rollout
from alignkit.engine import merge_rollouts
from alignkit.errors import ConfigError
from alignkit.models import TinyModelSpec, build_tiny_model, load_causal_lm

CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)
TWO_GPUS = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL across ranks"
)


def node(**values: object) -> object:
    return OmegaConf.create({"name": "cpu", "device": "cpu", "threads": None, **values})


def test_build_backend_by_name_and_unknown_name_lists_the_known_ones() -> None:
    assert type(build_backend(node(name="cpu"))) is CPUBackend
    assert set(BACKENDS) == {"cpu", "single_gpu", "fsdp"}
    with pytest.raises(ConfigError, match=r"backend.name='tpu'.*known: cpu, fsdp, single_gpu"):
        build_backend(node(name="tpu"))


def test_a_plugin_registered_backend_is_built() -> None:
    from alignkit.registry import ComponentRegistry

    class Custom(CPUBackend):
        name = "custom"

    registry = ComponentRegistry()
    registry.add("backend", "custom", lambda cfg: Custom(cfg))
    assert type(build_backend(node(name="custom"), registry)) is Custom
    registry.add("backend", "broken", lambda cfg: object())
    with pytest.raises(ConfigError, match="did not build an alignkit Backend"):
        build_backend(node(name="broken"), registry)


def test_shard_bounds_split_contiguously_and_refuse_uneven_splits() -> None:
    assert [shard_bounds(8, r, 2) for r in range(2)] == [(0, 4), (4, 8)]
    assert [shard_bounds(6, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    with pytest.raises(ConfigError, match="7 items cannot be split evenly over 2 ranks"):
        shard_bounds(7, 0, 2)


def test_cpu_backend_collectives_are_the_identity() -> None:
    backend = CPUBackend(node())
    t = torch.tensor([1.0, 2.0])
    assert backend.all_reduce(t, "sum") is t and t.tolist() == [1.0, 2.0]
    assert backend.all_reduce_mean({"a": 1, "b": 2.5}) == {"a": 1.0, "b": 2.5}
    assert backend.all_gather_object({"x": 1}) == [{"x": 1}]
    assert backend.shard([1, 2, 3]) == [1, 2, 3]
    assert backend.is_main_process and not backend.distributed
    assert backend.mixed_precision == "fp32"


def test_mixed_precision_auto_is_fp32_on_cpu_and_bad_values_name_the_key() -> None:
    assert Backend(node(mixed_precision="auto")).mixed_precision == "fp32"
    assert Backend(node(mixed_precision="bf16")).mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"backend\.mixed_precision must be auto, bf16 or fp32"):
        _ = Backend(node(mixed_precision="fp8")).mixed_precision


def test_seed_gives_every_rank_the_same_sampling_stream() -> None:
    backend = CPUBackend(node())
    g0 = backend.seed(5)
    backend.rank = 1
    g1 = backend.seed(5)
    # Every rank draws the global batch's numbers and uses its own rows' (generate(rows=...)),
    # so the generators, like the global RNG, start alike on every rank.
    assert g0.initial_seed() == g1.initial_seed() == 5
    assert torch.equal(g0.get_state(), g1.get_state())
    assert torch.initial_seed() == 5


def test_rng_state_round_trip_restores_every_stream() -> None:
    backend = CPUBackend(node())
    gen = backend.seed(3)
    state = backend.rng_state(gen)
    expected = (torch.rand(3), torch.rand(3, generator=gen), random.random())
    backend.load_rng_state(state, gen)
    again = (torch.rand(3), torch.rand(3, generator=gen), random.random())
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert expected[2] == again[2]


def _part(prompt: list[list[int]], response: list[list[int]], groups: list[int]) -> Rollout:
    ids = torch.tensor(prompt)
    resp = torch.tensor(response)
    return Rollout(
        prompt_ids=ids,
        prompt_mask=(ids != 0).long(),
        response_ids=resp,
        response_mask=(resp != 0).float(),
        group_ids=torch.tensor(groups),
        prompts=[f"p{g}" for g in groups],
        logprobs=-(resp != 0).float(),
        rewards=torch.tensor([float(g) for g in groups]),
        reward_components={"gold": torch.tensor([float(g) for g in groups])},
    )


def test_merge_rollouts_repads_prompts_left_responses_right_and_offsets_groups() -> None:
    # rank 0: 2 rows of one prompt, P=2, R=1; rank 1: 2 rows of one prompt, P=3, R=2.
    a = _part([[0, 5], [0, 5]], [[7], [8]], [0, 0])
    b = _part([[4, 4, 4], [4, 4, 4]], [[9, 9], [9, 0]], [0, 0])
    m = merge_rollouts([a, b], pad_token_id=0)
    m.validate()
    assert m.prompt_ids.tolist() == [[0, 0, 5], [0, 0, 5], [4, 4, 4], [4, 4, 4]]
    assert m.prompt_mask.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]
    assert m.response_ids.tolist() == [[7, 0], [8, 0], [9, 9], [9, 0]]
    assert m.response_mask.tolist() == [[1, 0], [1, 0], [1, 1], [1, 0]]
    assert m.logprobs.tolist() == [[-1, 0], [-1, 0], [-1, -1], [-1, 0]]
    assert m.group_ids.tolist() == [0, 0, 1, 1]  # rank 1's prompt is the second group
    assert m.prompts == ["p0", "p0", "p0", "p0"]
    assert m.reward_components["gold"].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert m.ref_logprobs is None and m.group_size == 2


def test_merge_rollouts_pads_per_token_extras_like_the_responses() -> None:
    # Mismatch weights are (B, R) per token: each rank's R differs, so they are padded.
    a = _part([[0, 5], [0, 5]], [[7], [8]], [0, 0])
    b = _part([[4, 4, 4], [4, 4, 4]], [[9, 9], [9, 0]], [0, 0])
    a.extras["w"], b.extras["w"] = torch.full((2, 1), 2.0), torch.full((2, 2), 3.0)
    a.extras["seq"], b.extras["seq"] = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    m = merge_rollouts([a, b], pad_token_id=0)
    assert m.extras["w"].tolist() == [[2.0, 0.0], [2.0, 0.0], [3.0, 3.0], [3.0, 3.0]]
    assert m.extras["seq"].tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(vocab_size=300, n_layer=2, n_head=2, n_embd=32, n_positions=32)
    corpus = ["User: hello there. Assistant: hi."] * 20
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "m", corpus, spec)


def test_transformer_blocks_are_the_hf_no_split_modules(tiny: Path) -> None:
    model, _ = load_causal_lm(tiny)
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["GPT2Block", "GPT2Block"]
    # Without _no_split_modules: the children of the longest ModuleList.
    plain = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3))
    assert len(transformer_blocks(plain)) == 3


def test_gradient_checkpointing_option_turns_it_on(tiny: Path) -> None:
    model, _ = load_causal_lm(tiny)
    backend = CPUBackend(node(gradient_checkpointing=True))
    # The flag is set on the blocks: each recomputes its activations in the backward pass.
    prepared = backend.prepare_model(model)
    assert all(block.gradient_checkpointing for block in transformer_blocks(prepared))
    frozen, _ = load_causal_lm(tiny)
    prepared = backend.prepare_model(frozen, trainable=False)
    assert not any(block.gradient_checkpointing for block in transformer_blocks(prepared))


def test_single_gpu_backend_without_cuda_fails_naming_the_fix() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error path cannot be reached")
    backend = build_backend(node(name="single_gpu", device="cuda"))
    with pytest.raises(ConfigError, match=r"backend=single_gpu needs a CUDA device.*backend=cpu"):
        backend.setup()


# ---------------------------------------------------------------------------------------------
# CUDA paths: run only where a GPU is present
# ---------------------------------------------------------------------------------------------


@CUDA
def test_single_gpu_places_the_model_and_autocasts_to_bf16(tiny: Path) -> None:
    backend = build_backend(node(name="single_gpu", device="cuda", mixed_precision="auto"))
    backend.setup()
    model, _ = load_causal_lm(tiny)
    model = backend.prepare_model(model)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32  # weights stay fp32
    ids = torch.randint(0, 100, (2, 8), device=backend.device)
    with backend.autocast():
        logits = model(input_ids=ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert next(model.parameters()).grad.dtype == torch.float32


@CUDA
def test_single_gpu_rl_stage_runs(sft_run: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    proc = run_cli(
        [
            "stage=rl",
            "experiment=smoke",
            "algorithm=reinforce",
            "reward=[gold]",
            "logger=none",
            "backend=single_gpu",
            f"model.path={sft_run / 'sft'}",
            f"run_dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rl" / "policy" / "model.safetensors").is_file()


@CUDA
@TWO_GPUS
def test_fsdp_on_two_gpus_with_nccl_and_bf16(sft_run: Path, tmp_path: Path) -> None:
    from tests.test_fsdp import RL, run_torchrun

    run_torchrun([*RL, f"model.path={sft_run / 'sft'}", "backend=fsdp", f"run_dir={tmp_path}"])
    assert (tmp_path / "rl" / "checkpoints" / "step_000003" / "dcp" / ".metadata").is_file()


def test_full_copy_is_independent_of_the_original(tiny: Path) -> None:
    model, _ = load_causal_lm(tiny)
    copy = CPUBackend(node()).full_copy(model)
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(model.parameters()))
