"""Every shell command in README.md and docs/*.md runs as written, at a smoke budget.

The rule, applied to each command:

1. **What is a command.** Every line of a fenced ``bash``/``sh``/``shell`` block of README.md and
   docs/*.md, indented fences inside lists included; ``#`` comments are dropped, lines ending
   in ``\\`` are joined with the next, comment-only lines (``#!``, ``#SBATCH``) are skipped.
2. **How it runs.** Through ``bash -c``, exactly as written, with the test environment's
   ``bin/`` first on ``PATH`` (so ``alignkit`` and ``python`` are this checkout's), in a fresh
   temporary folder per block that earlier commands of the same block share, so relative
   paths chain as they would for a reader (``run_dir=runs/sft`` then
   ``model.path=runs/sft/sft``); every output (``outputs/``, ``multirun/``, ``runs/``) lands
   there. Running a command first runs, once, the earlier commands of its block whose
   ``run_dir=``/``hydra.sweep.dir=`` folder it names (its inputs).
3. **The smoke budget.** Only to an ``alignkit`` Hydra run (``alignkit [-m] overrides...`` or
   ``torchrun ... -m alignkit.cli overrides...``; not ``alignkit plugins/compare/export``)
   this is appended: ``logger=none`` unless it chooses a logger, and ``experiment=smoke``
   unless it chooses an experiment. A command that chooses another experiment (e.g. a sweep
   grid in ``compare_algorithms``) keeps it, and gets the smoke experiment's values appended as
   ``key=value`` overrides instead (``model=nano``, ``rl.steps=3``, ... minus the keys it sets
   itself), so the grid runs as written at the smoke budget.
4. **docs/tutorial.md** commands run with the tutorial's plugin package extracted into the
   folder and importable (``PYTHONPATH`` + ``ALIGNKIT_PLUGINS``), as after its install step.
5. **What does not run here** is listed in :data:`ALLOWED` with the reason (a GPU, SLURM, the
   network, a hub model, a placeholder path, set-up of the environment itself). Its
   ``alignkit`` overrides are still composed with Hydra's compose API, without running
   (placeholders stay literal strings; a bare ``...`` is dropped; a sweep composes its first
   job); a ``make`` target must exist in the Makefile and a ``pip install 'alignkit[x]'``
   extra in pyproject.toml.
6. **Run by another test**: :data:`COVERED` names that test, and the command is skipped here.
7. **Slow** (more than ~20 s, or needing a slow command's output): :data:`SLOW`, marked
   ``@pytest.mark.slow``.

A stale entry in any list (no such command in the docs any more) fails
:func:`test_lists_name_only_documented_commands`, so the lists follow the docs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, cli_env

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell"}
SUBCOMMANDS = {"plugins", "compare", "export", "label"}

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

GPU = "needs a CUDA GPU (none here)"
HUB = "downloads a model from the Hugging Face hub (no network here)"
TORCHRUN_NODE = (
    "8 ranks on several nodes; tests/test_fsdp.py runs backend=fsdp on 2 gloo ranks and "
    "tests/test_multinode.py on 2 simulated nodes instead"
)
SLURM = "needs a SLURM cluster (sbatch, srun, scontrol)"

COVERED: dict[str, str] = {
    # docs/rollout.md: vLLM runs in its own environment, built and used by these tests.
    "scripts/setup_vllm_env.sh": (
        "tests/test_vllm_env.py::test_vllm_suite_passes_in_its_own_environment"
    ),
    ".venv-vllm/bin/alignkit algorithm=grpo rollout=vllm model=hf "
    "model.path=/path/to/tiny-llama experiment=smoke": (
        "tests/test_vllm.py::test_the_default_pipeline_runs_with_vllm_rollouts (in .venv-vllm)"
    ),
    # docs/data.md's runnable example, run as one block from the repository root.
    "python examples/own_data/make_model.py examples/own_data/data outputs/tiny-llama-chat": (
        "tests/test_own_data.py::test_the_documented_example_runs_as_written"
    ),
    "python examples/own_data/rule_judge.py examples/own_data/data/answers.json --port 8011 &": (
        "tests/test_own_data.py::test_the_documented_example_runs_as_written"
    ),
    "alignkit task=data model=hf model.path=outputs/tiny-llama-chat "
    "task.sft_data=examples/own_data/data/sft.jsonl "
    "task.prompt_data=examples/own_data/data/prompts.jsonl "
    "task.preference_data=examples/own_data/data/preferences.jsonl "
    "task.eval_data=examples/own_data/data/eval_prompts.jsonl "
    "eval.judge.backend=http eval.judge.url=http://127.0.0.1:8011/v1 eval.judge.top_logprobs=0 "
    "experiment=own_data run_dir=outputs/own_data": (
        "tests/test_own_data.py::test_the_documented_example_runs_as_written"
    ),
    # The tutorial's plugin package: installed (pip --target) and its own tests run.
    "python -m pip install -e ./alignkit-best-of-group": (
        "tests/test_tutorial.py::test_the_plugin_package_tests_pass"
    ),
    "python -m pytest alignkit-best-of-group/tests": (
        "tests/test_tutorial.py::test_the_plugin_package_tests_pass"
    ),
    # Benchmarks: their commands are checked to parse where they are documented.
    "make bench": "tests/test_benchmarks.py::test_documented_commands_parse",
    ".venv/bin/python -m benchmarks --threads 1": (
        "tests/test_benchmarks.py::test_documented_commands_parse"
    ),
    ".venv/bin/python -m benchmarks --arch gpt2,llama --no-scaling": (
        "tests/test_benchmarks.py::test_documented_commands_parse"
    ),
    ".venv/bin/python -m benchmarks --arch llama": (
        "tests/test_benchmarks.py::test_documented_commands_parse"
    ),
    ".venv/bin/python -m benchmarks --quick --arch gpt2,llama": (
        "tests/test_benchmarks.py::test_documented_commands_parse"
    ),
    'make bench ARGS="--arch gpt2,llama"': (
        "tests/test_benchmarks.py::test_documented_commands_parse"
    ),
}
"""Commands that another test runs (or checks) already: skipped here, pointing at it."""

ALLOWED: dict[str, str] = {
    # docs/benchmarks.md
    ".venv-vllm/bin/pip install --no-deps trl==1.16.0 accelerate==1.16.0": (
        "installs TRL into the vLLM environment, for the benchmark below"
    ),
    ".venv-vllm/bin/python -m benchmarks.vllm_rollout --steps 3 --rounds 2 --threads 1": (
        "a benchmark (run on a quiet machine, not in tests); tests/test_vllm.py runs its parts"
    ),
    # docs/rollout.md
    "pip install 'alignkit[vllm]'": "installs vLLM's CUDA build (a GPU machine)",
    "alignkit algorithm=grpo rollout=vllm model=hf model.path=/path/to/policy": (
        "placeholder path; vLLM is not in this environment (tests/test_vllm.py runs the same "
        "command on a tiny Llama in .venv-vllm)"
    ),
    "alignkit algorithm=grpo rollout=vllm rollout.gpu_memory_utilization=0.4 model=hf "
    "model.path=/path/to/policy backend=single_gpu": GPU,
    "ALIGNKIT_VLLM_AUTHKEY=change-me CUDA_VISIBLE_DEVICES=4,5,6,7 python -m "
    'alignkit.rollout.vllm_server --host 0.0.0.0 --port 51000 --engine \'{"model": '
    '"/path/to/policy", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.9, '
    '"logprobs_mode": "processed_logprobs", "worker_extension_cls": '
    '"alignkit.rollout.vllm_engine.WeightSyncExtension"}\'': f"{GPU}: 4 of them; "
    "tests/test_vllm.py runs the server on the CPU",
    "ALIGNKIT_VLLM_AUTHKEY=change-me CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --standalone "
    "--nproc_per_node=4 -m alignkit.cli backend=fsdp algorithm=grpo rollout=vllm "
    "rollout.mode=server rollout.url=inference-host:51000 model=hf "
    "model.path=/path/to/policy": f"{GPU}: 4 of them and a running server",
    # README.md
    "make run": "sets up the environment (scripts/bootstrap.sh), then the full-budget pipeline; "
    "`alignkit` runs the same pipeline here",
    "make test": "sets up the dev environment, then runs the default suite (this one)",
    "alignkit stage=feedback feedback.policy=outputs/.../sft feedback.format=pairwise": (
        "placeholder path outputs/.../sft"
    ),
    "alignkit stage=reward_model reward_model.data=[fb.jsonl] reward=plackett_luce": (
        "fb.jsonl stands for your feedback file"
    ),
    "alignkit stage=rl model.path=outputs/.../sft "
    "reward.bradley_terry.path=outputs/.../reward_model": "placeholder paths outputs/.../",
    "alignkit stage=eval eval.policy=A eval.baseline=B": "A and B stand for two policy folders",
    "alignkit backend=single_gpu": GPU,
    "alignkit stage=rl ... rl.resume=true": "`...` stands for the interrupted run's overrides",
    "alignkit export <run>/rl/checkpoints <out>": "placeholders <run> and <out>; "
    "tests/test_hf_native.py::test_export_policy_and_critic_of_an_rl_checkpoint runs export",
    "alignkit label <queue> --add-annotator ana": "placeholder <queue>; "
    "tests/test_label_app.py runs --add-annotator on a queue",
    "alignkit export <run>/reward_model <out>": "placeholders <run> and <out>; "
    "tests/test_hf_native.py runs export on reward models and critics",
    "alignkit stage=rl 'reward=[critique]' ...": "`...` stands for the run's other overrides",
    "alignkit -m experiment=compare_algorithms": "36 pipelines (12 algorithms x 3 seeds), "
    "~10 min at the smoke budget; its 2 x 2 version below runs (slow), tests/test_sweeps.py "
    "checks the grid",
    "alignkit -m experiment=compare_algorithms hydra.sweep.dir=multirun/algos": "36 pipelines "
    "(12 algorithms x 3 seeds); its 2 x 2 version in docs/sweeps.md runs (slow), "
    "tests/test_sweeps.py checks the grid",
    "alignkit compare multirun/algos": "compares the 36 pipelines of the sweep above; "
    "docs/sweeps.md runs compare on a 2 x 2 sweep (slow)",
    "alignkit task=data model=hf model.path=Qwen/Qwen2.5-0.5B-Instruct task.sft_data=sft.jsonl "
    "task.preference_data=prefs.parquet task.prompt_data=prompts.jsonl "
    "eval.judge.backend=http eval.judge.url=http://127.0.0.1:8000/v1": (
        f"{HUB}; your own data files and an HTTP judge server"
    ),
    # docs/backends.md
    "alignkit backend=single_gpu stage=rl model.path=outputs/.../sft backend.device=cuda:1": GPU,
    "torchrun --standalone --nproc_per_node=8 -m alignkit.cli backend=fsdp "
    "run_dir=outputs/fsdp-run": TORCHRUN_NODE,
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500 "
    "--rdzv_id=alignkit-job-1 -m alignkit.cli backend=fsdp run_dir=/shared/runs/job-1": (
        TORCHRUN_NODE
    ),
    "torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER "
    "--master_port=29500 -m alignkit.cli backend=fsdp run_dir=/shared/runs/job-1": TORCHRUN_NODE,
    "sbatch --nodes=4 --gpus-per-node=8 scripts/slurm_multinode.sbatch stage=rl "
    "model.path=/shared/sft run_dir=/shared/runs/rl-1": f"{SLURM}; tests/test_multinode.py runs "
    "the script with stand-ins for srun and scontrol",
    "for seed in 0 1 2; do sbatch --nodes=2 scripts/slurm_multinode.sbatch stage=rl "
    "model.path=/shared/sft seed=$seed run_dir=/shared/runs/rl-seed$seed; done": SLURM,
    "alignkit export outputs/run/rl/checkpoints/step_000040 exported/": "needs the 40-step "
    "FSDP run of the section above; tests/test_fsdp.py::"
    "test_fsdp_checkpoint_is_sharded_and_exports_to_a_loadable_hf_folder runs the same export",
    'python -c "from transformers import AutoModelForCausalLM; '
    "AutoModelForCausalLM.from_pretrained('exported')\"": "loads the export above; "
    "tests/test_fsdp.py loads an exported folder the same way",
    # docs/data.md
    "alignkit task=data model=hf model.path=Qwen/Qwen2.5-0.5B-Instruct task.sft_data=sft.jsonl "
    "task.preference_data=prefs.jsonl task.prompt_data=prompts.jsonl": (
        f"{HUB}; your own data files"
    ),
    "alignkit task=data task.prompt_data=questions.csv '+task.columns={prompt: question}' ...": (
        "questions.csv is your file; `...` stands for the other overrides"
    ),
    # docs/hooks.md
    "PYTHONPATH=./src ALIGNKIT_PLUGINS=my_algo=my_algo,logger=my_tools.logging:Plugin "
    "alignkit ...": "my_algo and my_tools stand for your own plugin modules",
    # docs/sweeps.md
    "wandb sync <run_dir>/wandb/offline-run-*": "uploads to W&B (network, a login)",
    "find multirun/2026-01-01/12-00-00 -type d -name 'offline-run-*' -exec wandb sync {} +": (
        "uploads to W&B (network, a login)"
    ),
    "pip install 'alignkit[sweep-joblib,sweep-slurm,sweep-optuna]'": "installs packages (a "
    "registry); this environment has the dev extras, which include these",
    "alignkit -m algorithm=ppo,grpo,rloo seed=0,1,2 hydra/launcher=joblib "
    "hydra.launcher.n_jobs=2": "the 9 jobs of the sweep above again, through joblib; "
    "tests/test_sweeps.py::test_joblib_launcher_runs_jobs_in_parallel_with_the_same_results",
    "alignkit -m algorithm=ppo,grpo,rloo seed=0,1,2 +sweep=joblib": "the same as the line "
    "above, from conf/sweep/joblib.yaml (tests/test_sweeps.py checks the config)",
    "alignkit -m algorithm=ppo,grpo,rloo seed=0,1,2 +sweep=slurm hydra.launcher.partition=gpu "
    "hydra.launcher.account=my_account hydra.launcher.gpus_per_node=1 backend.device=cuda": (
        f"{SLURM} and {GPU}"
    ),
    "alignkit -m +sweep=optuna_lr": "20 trials of the pipeline; the 5-trial line below runs "
    "(slow) and tests/test_sweeps.py runs an Optuna sweep",
    "alignkit compare multirun/2026-01-01/12-00-00": "an example sweep folder (a date); "
    "tests/test_compare.py compares a real sweep",
    "alignkit compare runs/a runs/b runs/c --out reports/abc": "example run folders; "
    "tests/test_compare.py::test_compare_accepts_a_list_of_run_directories",
}
"""Commands that cannot run here, with the reason; see rule 5 for what is checked instead."""

SLOW: dict[str, str] = {
    # README.md
    "alignkit algorithm=grpo": "the smoke pipeline with feedback and a reward model, ~20 s",
    "alignkit stage=sft model=nano": "SFT at the smoke budget, ~15-30 s",
    "alignkit 'reward=[gold]'": "the smoke pipeline, ~20 s",
    "alignkit algorithm=dpo": "the smoke pipeline with feedback and DPO, ~15-20 s",
    "alignkit pipeline.rounds=3": "3 rounds of the smoke pipeline, ~40 s",
    "alignkit experiment=oracle_feedback": "the smoke pipeline on the oracle's feedback, ~20 s",
    # docs/algorithms.md
    "alignkit -m experiment=compare_algorithms algorithm=gspo,dpo seed=0 "
    "hydra.sweep.dir=multirun/new_algos": "2 smoke pipelines, ~20-40 s",
    "alignkit stage=sft run_dir=runs/base": "feeds the stage-by-stage comparison below it",
    # docs/data.md
    "alignkit algorithm=dpo run_dir=runs/dpo": "the smoke pipeline with DPO; feeds the IPO run",
    # docs/feedback.md
    "alignkit run_dir=runs/people_like": "the smoke pipeline, ~20-30 s",
    "alignkit experiment=oracle_feedback run_dir=runs/oracle": (
        "the pipeline with the noise-free oracle at the smoke budget, ~20-30 s"
    ),
    "alignkit pipeline.rounds=3 run_dir=runs/rounds": "3 rounds at the smoke budget, ~40 s",
    "alignkit pipeline.rounds=3 'reward=[rm_ensemble]' reward_model.ensemble_size=3 "
    "feedback.selection=disagreement run_dir=runs/active": (
        "3 rounds with a 3-member ensemble at the smoke budget, ~1 min"
    ),
    "torchrun --standalone --nproc_per_node=2 -m alignkit.cli backend=fsdp": (
        "the smoke pipeline on 2 FSDP ranks"
    ),
    "alignkit stage=judge 'reward=[critique]'": "trains the tiny critique judge",
    "alignkit experiment=smoke": "the same run as `alignkit` under rule 3, ~20 s",
    "alignkit -m seed=0,1,2 experiment=smoke": "3 smoke pipelines, ~1 min",
    # docs/sweeps.md
    "alignkit -m algorithm=ppo,grpo,rloo seed=0,1,2": "9 smoke pipelines, ~3 min",
    "alignkit -m +sweep=optuna_lr experiment=smoke hydra.sweeper.n_trials=5": (
        "5 smoke pipelines, ~2 min"
    ),
    "alignkit -m experiment=compare_algorithms algorithm=ppo,grpo seed=0,1": (
        "4 smoke pipelines, ~1.5 min"
    ),
    "alignkit stage=sft run_dir=runs/sft": "feeds the RL or reward-model sweeps below it",
    "alignkit stage=sft experiment=smoke run_dir=runs/sft": "feeds the RL sweeps below it",
    "alignkit -m stage=rl experiment=smoke 'reward=[gold]' model.path=runs/sft/sft "
    "algorithm=reinforce,ppo,grpo seed=0,1,2 rl.steps=30 rl.prompts_per_step=8 "
    "rl.samples_per_prompt=4 rl.optim.lr=5e-4 hydra.sweep.dir=multirun/algorithms": (
        "9 RL runs of 30 steps (the docs' compare.png), minutes"
    ),
    # docs/tutorial.md
    "alignkit algorithm=best_of_group experiment=smoke rl.kl_coef=0": (
        "the smoke pipeline with the tutorial's plugin, ~20 s"
    ),
}
"""Commands that run here but take longer than ~20 s: the reason (roughly what they run)."""


# ---------------------------------------------------------------------------------------------
# collecting the commands
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One shell command of a document, continuations joined and comments dropped."""

    doc: str
    """The document, relative to the repository (``docs/sweeps.md``)."""
    block: int
    """Which shell block of the document (0-based)."""
    index: int
    """Its position in the block (0-based)."""
    line: int
    """The 1-based line of the document it starts on."""
    text: str

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def strip_comment(line: str) -> str:
    """``line`` without a shell ``#`` comment (a ``#`` that starts a word outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_blocks(text: str) -> Iterator[tuple[int, list[str]]]:
    """``(first line number, dedented lines)`` of every fenced shell block of a document."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        i += 1
        if fence is None:
            continue
        indent, marker, lang = fence.groups()
        body_start, body = i + 1, []
        while i < len(lines) and lines[i].strip() != marker:
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang in SHELLS:
            yield body_start, body


def block_commands(first_line: int, lines: list[str]) -> Iterator[tuple[int, str]]:
    """``(line number, command)``: comments dropped, ``\\`` continuations joined."""
    pending: list[str] = []
    start = first_line
    for offset, raw in enumerate(lines):
        line = strip_comment(raw)
        if not pending:
            start = first_line + offset
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        if line.strip():
            pending.append(line.strip())
        if pending:
            yield start, " ".join(pending)
            pending = []
    if pending:
        yield start, " ".join(pending)


def collect() -> list[Command]:
    """Every command of README.md and docs/*.md, in document order."""
    commands = []
    for path in DOCS:
        doc = path.relative_to(REPO).as_posix()
        blocks = shell_blocks(path.read_text(encoding="utf-8"))
        for b, (first, lines) in enumerate(blocks):
            for i, (line, text) in enumerate(block_commands(first, lines)):
                commands.append(Command(doc, b, i, line, text))
    return commands


COMMANDS = collect()


# ---------------------------------------------------------------------------------------------
# reading an alignkit command line
# ---------------------------------------------------------------------------------------------


def hydra_overrides(text: str) -> list[str] | None:
    """The Hydra overrides of an ``alignkit`` run (``None``: not an alignkit Hydra run).

    Leading ``VAR=value`` assignments and ``srun`` are skipped; ``-m``, ``--cfg X`` and a bare
    ``...`` (a placeholder for "your other overrides") are not overrides.
    """
    argv = shlex.split(text)
    while argv and (_ENV_ASSIGNMENT.match(argv[0]) or argv[0] == "srun"):
        argv = argv[1:]
    if not argv:
        return None
    if argv[0] == "alignkit":
        args = argv[1:]
        if args[:1] and args[0] in SUBCOMMANDS:
            return None
    elif argv[0] == "torchrun" and "alignkit.cli" in argv:
        args = argv[argv.index("alignkit.cli") + 1 :]
    else:
        return None
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in ("--cfg", "-c"):
            skip = True
        elif a not in ("-m", "--multirun", "--resolve", "..."):
            out.append(a)
    return out


def override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def smoke_values() -> list[str]:
    """conf/experiment/smoke.yaml as ``key=value`` overrides (its defaults as group choices)."""
    import yaml

    raw = yaml.safe_load((REPO / "conf" / "experiment" / "smoke.yaml").read_text())
    out = []
    for entry in raw.pop("defaults", []):
        for group, choice in entry.items():
            out.append(f"{group.removeprefix('override ').lstrip('/')}={choice}")

    def flatten(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                flatten(f"{prefix}{k}.", v)
        else:
            out.append(f"{prefix[:-1]}={node}")

    flatten("", raw)
    return out


def smoke_overrides(text: str) -> list[str]:
    """What rule 3 appends to ``text``: nothing unless it is an alignkit Hydra run."""
    overrides = hydra_overrides(text)
    if overrides is None:
        return []
    keys = {override_key(o): o.partition("=")[2] for o in overrides}
    extra = [] if "logger" in keys else ["logger=none"]
    if "experiment" not in keys:
        return [*extra, "experiment=smoke"]
    if keys["experiment"] == "smoke":
        return extra
    return [*extra, *(o for o in smoke_values() if override_key(o) not in keys)]


def first_job(overrides: list[str]) -> list[str]:
    """The overrides of a sweep's first job (a plain run's overrides are returned as parsed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for o in parsed:
        if o.is_sweep_override():
            prefix = o.input_line.partition("=")[0]
            out.append(f"{prefix}={next(iter(o.sweep_string_iterator()))}")
        else:
            out.append(o.input_line)
    return out


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


def written_folders(text: str) -> list[str]:
    """The folders an alignkit run writes to, as given (``run_dir=``, ``hydra.sweep.dir=``)."""
    overrides = hydra_overrides(text) or []
    return [
        o.partition("=")[2] for o in overrides if override_key(o) in ("run_dir", "hydra.sweep.dir")
    ]


def dependencies(command: Command) -> list[Command]:
    """Earlier runnable commands of its block whose output folders it names, transitively.

    ``model.path=runs/sft/sft`` depends on the earlier ``run_dir=runs/sft``; the independent
    one-liners of a list (README's) depend on nothing.
    """
    found: list[Command] = []
    for earlier in reversed(COMMANDS):
        same_block = earlier.doc == command.doc and earlier.block == command.block
        if not (same_block and earlier.index < command.index and runnable(earlier)):
            continue
        wanted = [command, *found]
        if any(f in c.text for f in written_folders(earlier.text) for c in wanted):
            found.append(earlier)
    return sorted(found, key=lambda c: c.index)


def is_slow(command: Command) -> bool:
    """Listed slow, or depending on a slow command (it runs that one first)."""
    return any(c.text in SLOW for c in [command, *dependencies(command)])


def runnable(command: Command) -> bool:
    return command.text not in ALLOWED and command.text not in COVERED


def _params(select: Any) -> list[Any]:
    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.slow] if is_slow(c) else [])
        for c in COMMANDS
        if select(c)
    ]


_BLOCKS: dict[tuple[str, int], tuple[Path, set[int]]] = {}


def _block_dir(command: Command, tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = (command.doc, command.block)
    if key not in _BLOCKS:
        folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", f"{command.doc}_{command.block}"))
        if command.doc == "docs/tutorial.md":
            from tests.test_tutorial import TUTORIAL, extract_files

            for rel, content in extract_files(TUTORIAL.read_text(encoding="utf-8")).items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_text(content, encoding="utf-8")
        _BLOCKS[key] = (folder, set())
    return _BLOCKS[key][0]


def _env(command: Command, cwd: Path) -> dict[str, str]:
    env = cli_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if command.doc == "docs/tutorial.md":  # rule 4: the plugin as if installed
        package = cwd / "alignkit-best-of-group"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package), env.get("PYTHONPATH")]))
        env.setdefault("ALIGNKIT_PLUGINS", "best_of_group=alignkit_best_of_group")
    return env


def run_as_written(command: Command, cwd: Path, timeout: float) -> None:
    script = " ".join([command.text, *map(shlex.quote, smoke_overrides(command.text))])
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=_env(command, cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{command.id}: `{script}` failed ({proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


@pytest.mark.parametrize("command", _params(runnable))
def test_documented_command_runs(
    command: Command, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cwd = _block_dir(command, tmp_path_factory)
    done = _BLOCKS[(command.doc, command.block)][1]
    timeout = 1800 if is_slow(command) else 300
    for earlier in dependencies(command):  # e.g. the SFT run its model.path names
        if earlier.index not in done:
            run_as_written(earlier, cwd, timeout)
            done.add(earlier.index)
    run_as_written(command, cwd, timeout)
    done.add(command.index)


# ---------------------------------------------------------------------------------------------
# what does not run here is still checked
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Iterator[Any]:
    """Hydra's compose API over alignkit's config, every plugin's schemas registered."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from alignkit.cli import registration

    registration()
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        yield lambda overrides: hydra_compose(
            "config", overrides=overrides, return_hydra_config=True
        )


def _checkable(command: Command) -> bool:
    argv = shlex.split(command.text)
    return command.text in ALLOWED and (
        hydra_overrides(command.text) is not None
        or argv[:1] == ["make"]
        or (argv[:2] == ["pip", "install"] and "alignkit[" in command.text)
    )


@pytest.mark.parametrize("command", [pytest.param(c, id=c.id) for c in COMMANDS if _checkable(c)])
def test_allowed_command_is_valid(command: Command, compose: Any) -> None:
    """Rule 5: composed without running, or its make target / pip extra exists."""
    argv = shlex.split(command.text)
    if argv[:1] == ["make"]:
        target = argv[1]
        assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M)
        return
    if argv[:2] == ["pip", "install"]:
        import tomllib

        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]
        for spec in re.findall(r"alignkit\[([^\]]+)\]", command.text):
            for extra in spec.split(","):
                assert extra in extras, f"{command.id}: no extra {extra!r} in pyproject.toml"
        return
    overrides = hydra_overrides(command.text)
    assert overrides is not None
    # Composition fails on a misspelt key, a missing group option or bad override syntax.
    cfg = compose(first_job(overrides))
    assert cfg.stage


# ---------------------------------------------------------------------------------------------
# the collector and the lists
# ---------------------------------------------------------------------------------------------


def test_lists_name_only_documented_commands() -> None:
    documented = {c.text for c in COMMANDS}
    for name, listed in (("COVERED", COVERED), ("ALLOWED", ALLOWED), ("SLOW", SLOW)):
        stale = sorted(set(listed) - documented)
        assert not stale, f"{name} lists commands that no document has any more: {stale}"
    assert not set(ALLOWED) & set(COVERED)
    assert not set(SLOW) & (set(ALLOWED) | set(COVERED))
    assert all(reason.strip() for reason in [*ALLOWED.values(), *SLOW.values()])


def test_collector_reads_continuations_comments_and_indented_fences() -> None:
    text = "\n".join(
        [
            "- a list item:",
            "",
            "  ```bash",
            "  alignkit -m seed=0,1 \\",
            "    experiment=smoke   # two seeds",
            "  # a comment line",
            "  alignkit 'reward=[gold]' x='a # b'",
            "  ```",
            "```python",
            "alignkit not-a-shell-block",
            "```",
        ]
    )
    ((first, lines),) = shell_blocks(text)
    assert first == 4
    assert list(block_commands(first, lines)) == [
        (4, "alignkit -m seed=0,1 experiment=smoke"),
        (7, "alignkit 'reward=[gold]' x='a # b'"),
    ]


def test_smoke_budget_is_appended_to_alignkit_runs_only() -> None:
    assert smoke_overrides("alignkit stage=sft") == ["logger=none", "experiment=smoke"]
    assert smoke_overrides("alignkit experiment=smoke logger=none") == []
    assert smoke_overrides("alignkit plugins") == []
    assert smoke_overrides("alignkit compare multirun/x") == []
    assert smoke_overrides("make run") == []
    grid = smoke_overrides("alignkit -m experiment=compare_algorithms rl.steps=30")
    assert "model=nano" in grid and "rl.prompts_per_step=4" in grid
    assert not any(o.startswith("rl.steps=") for o in grid)
    assert hydra_overrides("A=1 torchrun --nproc_per_node=2 -m alignkit.cli backend=fsdp") == [
        "backend=fsdp"
    ]
    assert first_job(["algorithm=ppo,grpo", "seed=0"]) == ["algorithm=ppo", "seed=0"]


def test_a_command_depends_on_the_runs_it_reads() -> None:
    tutorial_rl = next(c for c in COMMANDS if "best_of_group" in c.text and "stage=rl" in c.text)
    assert [c.text for c in dependencies(tutorial_rl)] == [
        "alignkit experiment=smoke stage=sft logger=none run_dir=runs/sft"
    ]
    plugins = next(c for c in COMMANDS if c.text == "alignkit plugins")
    assert dependencies(plugins) == [] and not is_slow(plugins)


def test_every_document_with_commands_is_read() -> None:
    docs = {c.doc for c in COMMANDS}
    assert {"README.md", "docs/sweeps.md", "docs/tutorial.md", "docs/backends.md"} <= docs
    assert any(c.text == "alignkit plugins" for c in COMMANDS)
