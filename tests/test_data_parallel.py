"""The data-parallel update: ``backend=fsdp`` on 2 gloo ranks splits the work of a step and
still computes what one process computes on the same global batch.

Each case runs at several optimizer steps per RL step (``minibatch_size=2``,
``grad_accum_steps=2`` on 8 rows, 2 epochs): every global minibatch is split over the ranks
(2 rows each, one micro-batch of 2 rows on each rank instead of two micro-batches in one
process), normalised by the minibatch's global counts, and the metrics are summed over
ranks. The comparison is every logged metric of every step and the final weights. Both runs
sample the same responses: sampling does not depend on the number of ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.errors import ConfigError
from alignkit.rl.update import _check_divisible, minibatches, rank_share
from alignkit.tracking import read_metrics
from tests.test_arch_matrix import Runner, assert_weights_close, launch_on_two_ranks

SPLIT = [
    "stage=rl",
    "experiment=smoke",
    "reward=[gold]",
    "rl.steps=2",
    "rl.prompts_per_step=4",
    "rl.samples_per_prompt=2",
    "rl.max_new_tokens=8",
    "rl.kl_coef=0.05",
    "algorithm.minibatch_size=2",
    "algorithm.grad_accum_steps=2",
]
CASES = {
    "ppo-shared": ["algorithm=ppo", "algorithm.value_model=shared", "algorithm.ppo_epochs=2"],
    "ppo-separate": ["algorithm=ppo", "algorithm.value_model=separate", "algorithm.ppo_epochs=2"],
    "grpo": ["algorithm=grpo", "algorithm.epochs=2"],
    "rloo": ["algorithm=rloo", "algorithm.epochs=2"],
    # One optimizer step over the batch: the separate critic learns in the advantage phase
    # from its rollout forward (value_forward_once), each rank on its half of the rows.
    "ppo-critic-once": [
        "algorithm=ppo",
        "algorithm.value_model=separate",
        "algorithm.ppo_epochs=1",
        "algorithm.minibatch_size=4",
    ],
}
# Float sums in another order (micro-batches regrouped, gradients summed over ranks, sharded
# norms): the same bounds as the FSDP tests of tests/test_arch_matrix.py.
RTOL, ATOL = 5e-5, 1e-5


def _args(case: str, sft: Path) -> list[str]:
    # The algorithm group first: its fields (minibatch_size, ...) exist once it is chosen;
    # the case's own settings last, over the shared ones.
    first, *rest = CASES[case]
    return [first, *SPLIT, *rest, f"model.path={sft}"]


@pytest.fixture(scope="module")
def two_rank_runs(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One torchrun launch (2 gloo ranks) running every case; ``{case: run_dir, "log": ...}``."""
    root = tmp_path_factory.mktemp("data_parallel")
    runs, out = [], {}
    for case in CASES:
        run_dir = root / case
        overrides = ["logger=none", *_args(case, sft_run / "sft"), "backend=fsdp"]
        runs.append({"run_dir": str(run_dir), "overrides": overrides})
        out[case] = run_dir
    out["log"] = launch_on_two_ranks(runs, root)
    return out


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "rl"]


def _compared(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: v
        for k, v in record.items()
        if isinstance(v, float) and "time/" not in k and k != "update/rows"
    }


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_on_half_the_rows_and_match_one_process(
    case: str, two_rank_runs: dict[str, Any], sft_run: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    run_dir = two_rank_runs[case]
    errors = sorted(run_dir.glob("error_rank*.txt"))
    assert not errors, errors[0].read_text()[-4000:]
    assert (run_dir / "metrics.jsonl").is_file(), two_rank_runs["log"]
    Runner()(_args(case, sft_run / "sft"), tmp_path)
    got, want = _rows(run_dir), _rows(tmp_path)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1]
    for g, w in zip(got, want, strict=True):
        # The split is real: each rank trained on half of the 8 rows.
        assert w["update/rows"] == 8.0
        assert g["update/rows"] == 4.0
        a, b = _compared(g), _compared(w)
        assert a.keys() == b.keys()
        for key in sorted(b):
            # A clip fraction counts tokens past a boundary: a ratio sitting on it may fall
            # either side under sums taken in another order (one token of ~60 per step).
            atol = 0.05 if key.endswith("clipfrac") else ATOL
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=atol), (key, a[key], b[key])
    assert got[1]["loss/policy"] != got[0]["loss/policy"]  # learning happened
    # Weights after 2 RL steps of 4 optimizer steps each.
    a = load_file(run_dir / "rl" / "policy" / "model.safetensors")
    b = load_file(tmp_path / "rl" / "policy" / "model.safetensors")
    assert_weights_close(a, b, adam_steps=8)


def test_rank_shares_partition_a_minibatch_and_keep_groups_together() -> None:
    rows = torch.tensor([5, 0, 3, 6, 1, 2, 7, 4])
    groups = torch.arange(8) // 2  # prompt groups of 2 samples
    shares = [rank_share(rows, r, 2, groups=groups) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == list(range(8))
    assert [sorted(s.tolist()) for s in shares] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    lengths = torch.tensor([1, 8, 2, 7, 3, 6, 4, 5])
    dealt = [rank_share(rows, r, 2, lengths=lengths).tolist() for r in range(2)]
    # Longest first, dealt in turn: 1(8) 3(7) 5(6) 7(5) 6(4) 4(3) 2(2) 0(1).
    assert dealt == [[1, 5, 6, 2], [3, 7, 4, 0]]
    assert rank_share(rows, 0, 1).tolist() == rows.tolist()


def test_a_minibatch_that_does_not_split_over_the_ranks_is_refused() -> None:
    _check_divisible(minibatches(8, 4, 1, seed=0), 2)
    with pytest.raises(ConfigError, match=r"minibatch of 3 rows does not split evenly over 2"):
        _check_divisible(minibatches(7, 4, 1, seed=0), 2)


def test_sampling_a_share_of_the_batch_draws_what_one_process_draws() -> None:
    from alignkit.models.generation import sample_from

    probs = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(0)), -1)
    whole = sample_from(probs, torch.Generator().manual_seed(3))
    shares = [
        sample_from(probs[r * 3 : (r + 1) * 3], torch.Generator().manual_seed(3), rows=(r * 3, 6))
        for r in range(2)
    ]
    assert torch.cat(shares).tolist() == whole.tolist()
    # Without the offsets each rank would draw the first rows' numbers.
    assert sample_from(probs[3:], torch.Generator().manual_seed(3)).tolist() != whole[3:].tolist()
    with pytest.raises(ValueError, match="rows="):
        sample_from(probs[:3], torch.Generator(), rows=(4, 6))


def test_whole_group_minibatches_refuse_shares_that_split_a_group() -> None:
    """3 pairs on 2 ranks would give each rank one and a half pairs."""
    from alignkit.rl.update import DataParallel, run_minibatch_updates

    def loss_fn(rows: torch.Tensor, counts: object) -> tuple[torch.Tensor, dict]:
        raise AssertionError("no forward may run")

    parallel = DataParallel(0, 2, mean=lambda d: d)
    groups = torch.arange(3).repeat_interleave(2)
    with pytest.raises(ConfigError, match="not whole groups of 2"):
        run_minibatch_updates(
            loss_fn,
            torch.ones(6, 3),
            [],
            epochs=1,
            minibatch_size=6,
            grad_accum_steps=1,
            max_len=3,
            groups=groups,
            parallel=parallel,
            whole_groups=True,
        )
