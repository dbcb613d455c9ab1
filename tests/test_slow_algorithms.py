"""Each 2026 algorithm lifts the gold score of the default SFT policy on the built-in task
(``make test-slow``; docs/algorithms.md has the full-budget figures).

One default-budget SFT policy, the noise-free simulated human's feedback on it
(``experiment=oracle_feedback``) and the reward model trained on it are shared; each
algorithm then trains ``STEPS`` RL steps from the SFT policy (scored by that reward model; DPO
on the feedback itself) and is evaluated against it by the gold oracle on held-out prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow

STEPS = 20
EVAL = ["eval.num_prompts=48"]


def _run(args: list[str]) -> None:
    proc = run_cli([*args, "logger=none"], env=cli_env(OMP_NUM_THREADS="2"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SFT, feedback and reward model at the default budget, in one run directory."""
    run = tmp_path_factory.mktemp("pipeline")
    _run(["stage=sft", f"run_dir={run}"])
    # The noise-free oracle's feedback: the test is about each algorithm's learning, not about
    # surviving noisy labels (tests/test_slow_human_feedback.py).
    fb = ["stage=feedback", "experiment=oracle_feedback", f"feedback.policy={run / 'sft'}"]
    _run([*fb, f"run_dir={run}"])
    _run(
        [
            "stage=reward_model",
            "experiment=oracle_feedback",
            f"reward_model.backbone={run / 'sft'}",
            f"run_dir={run}",
        ]
    )
    return run


ALGORITHMS = {
    "gspo": [],
    "dapo": [],
    "cispo": [],
    "remax": [],
    "dr_grpo": [],
    "dpo": ["reward=[]"],  # trains on the pipeline's feedback (algorithm.data below)
    "online_dpo": [],
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_the_algorithm_raises_the_gold_score_over_sft(
    pipeline: Path, tmp_path: Path, algorithm: str
) -> None:
    sft = pipeline / "sft"
    source = (
        [f"algorithm.data={pipeline / 'feedback'}"]
        if algorithm == "dpo"
        else [f"reward.bradley_terry.path={pipeline / 'reward_model'}"]
    )
    rl = tmp_path / "rl"
    _run(
        [
            "stage=rl",
            f"algorithm={algorithm}",
            f"rl.steps={STEPS}",
            *ALGORITHMS[algorithm],
            *source,
            f"model.path={sft}",
            f"run_dir={rl}",
        ]
    )
    out = tmp_path / "eval"
    _run(
        [
            "stage=eval",
            f"eval.policy={rl / 'rl' / 'policy'}",
            f"eval.baseline={sft}",
            *EVAL,
            f"run_dir={out}",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gold_score_policy"] > summary["gold_score_sft"] + 0.02, summary
    assert summary["gold_win_rate"] > 0.5, summary
