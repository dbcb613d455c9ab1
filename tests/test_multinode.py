"""backend=fsdp across nodes, as far as one machine allows, and checkpoints resumed on another
number of ranks.

* **Rendezvous.** Two ``torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d`` agents,
  one per simulated node, started concurrently, meet at ``127.0.0.1:<free port>`` and run an
  RL job on gloo: the same metrics, checkpoint and weights as ``--standalone
  --nproc_per_node=2``.
* **SLURM.** ``scripts/slurm_multinode.sbatch`` is valid bash, builds the srun + torchrun
  command from SLURM's variables (``ALIGNKIT_DRY_RUN=1``), its overrides compose, and it runs
  end to end with stand-ins for ``srun`` (one task per node, concurrently) and ``scontrol``.
* **Resharding.** A 2-rank FSDP checkpoint (DCP shards) resumed on 1 rank, and that run's
  1-rank checkpoint resumed on 2 ranks, continue the uninterrupted 2-rank trajectory.

Sampling does not depend on the number of ranks (every rank draws the global batch's numbers
and uses its own rows'; every rank's RNG state is the same), so runs on any number of ranks,
and resumes on another, sample the same responses. Tolerances are tests/test_fsdp.py's (1e-5
relative, 1e-6 absolute): FSDP over 1 rank and over 2 sums float32 shards in a different
order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from alignkit.tracking import read_metrics
from tests.conftest import REPO, cli_env, run_cli

SCRIPT = REPO / "scripts" / "slurm_multinode.sbatch"
RTOL, ATOL = 1e-5, 1e-6
STEPS = 6
LR = 1e-4  # rl.optim.lr's default: the bound on one Adam step of a parameter


def rl_args(sft_run: Path) -> list[str]:
    """A 6-step RL run with a checkpoint every 2 steps, all three kept."""
    return [
        "stage=rl",
        "experiment=smoke",
        "algorithm=reinforce",
        "reward=[gold]",
        "logger=none",
        f"rl.steps={STEPS}",
        "rl.checkpoint_every=2",
        "rl.keep_checkpoints=3",
        f"model.path={sft_run / 'sft'}",
    ]


def torchrun(launcher: list[str], args: list[str], timeout: float = 300) -> str:
    """``torchrun LAUNCHER -m alignkit.cli ARGS`` (one agent); returns its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "alignkit.cli", *args]
    proc = subprocess.run(
        cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_concurrently(
    commands: list[list[str]], logs: Path, env: dict[str, str], timeout: float = 300
) -> None:
    """Start every command at once (each in its own process group), wait for all; on a
    failure or a timeout kill the groups this started and show the logs."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, cmd in enumerate(commands):
        with (logs / f"node{i}.log").open("w") as out:
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )  # fmt: skip
    codes: list[int | None] = []
    try:
        for proc in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = "\n".join(
        f"--- node{i}\n{(logs / f'node{i}.log').read_text()[-3000:]}" for i in range(2)
    )
    assert codes == [0] * len(procs), text


def truncated_copy(run_dir: Path, out: Path, step: int) -> Path:
    """A copy of ``run_dir`` as a crash right after the step-``step`` checkpoint leaves it."""
    shutil.copytree(run_dir, out)
    root = out / "rl" / "checkpoints"
    for ckpt in root.glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(out / "rl" / "policy")
    (root / "latest").write_text(f"step_{step:06d}\n")
    return out


def untimed(record: dict) -> dict:
    """A metrics record without its wall-clock times (``time/...``), which differ run to run."""
    return {k: v for k, v in record.items() if not k.startswith("time/")}


def assert_same_trajectory(got_dir: Path, want_dir: Path) -> None:
    """One metrics record per step, every number equal within the tolerances."""
    got, want = read_metrics(got_dir / "metrics.jsonl"), read_metrics(want_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(STEPS))
    assert [r["step"] for r in want] == list(range(STEPS))
    for g, w in zip(got, want, strict=True):
        g, w = untimed(g), untimed(w)
        assert g.keys() == w.keys(), g["step"]
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=RTOL, abs=ATOL), (g["step"], key)
            else:
                assert g[key] == value, (g["step"], key)


def assert_kept(got_dir: Path, source_dir: Path, before: int) -> None:
    """The records of the steps before the resume are the source run's, untouched."""
    got, source = (
        read_metrics(got_dir / "metrics.jsonl"),
        read_metrics(source_dir / "metrics.jsonl"),
    )
    assert [r for r in got if r["step"] < before] == [r for r in source if r["step"] < before]


def assert_close_weights(got_dir: Path, want_dir: Path, steps: int) -> None:
    """Final policies equal to 2e-5 (measured 3e-8), except the attention key biases.

    Their exact gradient is 0 (softmax ignores a per-query constant), so Adam, dividing by
    sqrt(v), turns rounding noise into steps of up to lr; they get ``steps`` such steps
    (measured 1.4e-5 over 4 steps)."""
    from safetensors.torch import load_file

    a = load_file(got_dir / "rl" / "policy" / "model.safetensors")
    b = load_file(want_dir / "rl" / "policy" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attn.c_attn.bias"):
            q, k, v = a[name].chunk(3)
            q_want, k_want, v_want = b[name].chunk(3)
            torch.testing.assert_close(k, k_want, rtol=0, atol=steps * LR, msg=name)
            a[name], b[name] = torch.cat([q, v]), torch.cat([q_want, v_want])
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=2e-5, msg=name)


@pytest.fixture(scope="module")  # ~10-12 s: one 2-rank launch
def two_ranks(sft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 6 steps on 2 ranks of one machine, checkpoints at steps 2, 4 and 6."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    args = [*rl_args(sft_run), "backend=fsdp", f"run_dir={run_dir}"]
    torchrun(["--standalone", "--nproc_per_node=2"], args)
    return run_dir


# ---------------------------------------------------------------------------------------------
# rendezvous across (simulated) nodes
# ---------------------------------------------------------------------------------------------


def test_two_nodes_meet_through_c10d_rendezvous_and_match_a_standalone_run(
    two_ranks: Path, sft_run: Path, tmp_path: Path
) -> None:
    """~15 s (19 s on a busy machine): two torchrun agents, one process each, sharing a
    run_dir (the shared disk)."""
    run_dir = tmp_path / "run"
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
    agent += ["--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}"]
    # --local_addr: the address the node's ranks are reached at (a machine whose hostname
    # resolves to an outside address would otherwise publish that one).
    agent += ["--rdzv_id=two-nodes", "--local_addr=127.0.0.1", "-m", "alignkit.cli"]
    agent += [*rl_args(sft_run), "backend=fsdp", f"run_dir={run_dir}"]
    run_concurrently([agent, agent], tmp_path / "logs", cli_env())

    got = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(STEPS))  # rank 0 alone logged, once a step
    # Same world size, same shards: bitwise the standalone run's numbers and weights.
    assert [untimed(r) for r in got] == [
        untimed(r) for r in read_metrics(two_ranks / "metrics.jsonl")
    ]
    from safetensors.torch import load_file

    a = load_file(run_dir / "rl" / "policy" / "model.safetensors")
    b = load_file(two_ranks / "rl" / "policy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    # Both nodes' ranks wrote into the one checkpoint.
    ckpt = run_dir / "rl" / "checkpoints" / "step_000006"
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert {p.name for p in (ckpt / "dcp").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------
# the SLURM script
# ---------------------------------------------------------------------------------------------


def fake_slurm_bin(folder: Path, first_node: str) -> Path:
    """``scontrol`` (lists ``first_node`` then another host) and ``srun`` (runs its command
    once per node, concurrently, as ``--ntasks-per-node=1`` does) stand-ins in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scontrol").write_text(
        "#!/bin/bash\n"
        '[[ "$1 $2" == "show hostnames" && -n $3 ]] || exit 2\n'
        f"printf '%s\\n' {first_node} other-node\n"
    )
    (folder / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == -* ]]; do shift; done  # srun's own --opt=value options\n"
        "pids=()\n"
        "for ((n = 0; n < SLURM_JOB_NUM_NODES; n++)); do\n"
        '    SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" &\n'
        "    pids+=($!)\n"
        "done\n"
        "rc=0\n"
        'for p in "${pids[@]}"; do wait "$p" || rc=$?; done\n'
        "exit $rc\n"
    )
    for name in ("scontrol", "srun"):
        (folder / name).chmod(0o755)
    return folder


def slurm_env(bin_dir: Path, submit_dir: Path, **extra: str) -> dict[str, str]:
    env = cli_env(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="rl",
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="node[01-02]",
        SLURM_SUBMIT_DIR=str(submit_dir),
        **extra,
    )
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def dry_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**env, "ALIGNKIT_DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_slurm_script_is_valid_bash_with_sbatch_defaults() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = SCRIPT.read_text()
    assert text.startswith("#!/bin/bash\n")
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--requeue"):
        assert f"#SBATCH {option}" in text
    # sbatch reads #SBATCH lines only up to the first command.
    first_command = next(
        i for i, line in enumerate(text.splitlines()) if line.strip() and not line.startswith("#")
    )
    assert (
        max(i for i, ln in enumerate(text.splitlines()) if ln.startswith("#SBATCH")) < first_command
    )


@pytest.fixture(scope="module")
def compose() -> Any:
    """Hydra's compose API over alignkit's config, every plugin's schemas registered."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from alignkit.cli import registration

    registration()
    with initialize_config_module(config_module="alignkit.conf", version_base="1.3"):
        yield lambda overrides: hydra_compose("config", overrides=overrides)


def test_slurm_script_builds_the_torchrun_command_from_slurm_variables(
    tmp_path: Path, compose: Any
) -> None:
    env = slurm_env(fake_slurm_bin(tmp_path / "bin", "node01"), tmp_path, SLURM_GPUS_ON_NODE="4")
    proc = dry_run(["stage=rl", "model.path=/shared/my sft"], env)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv == [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "torchrun",
        "--nnodes=2",
        "--nproc_per_node=4",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node01:29500",
        "--rdzv_id=4242",
        "-m",
        "alignkit.cli",
        "backend=fsdp",
        f"run_dir={tmp_path}/runs/rl-4242",
        "rl.resume=true",
        "stage=rl",
        "model.path=/shared/my sft",  # one argument, spaces kept
    ]
    cfg = compose(argv[argv.index("alignkit.cli") + 1 :])
    assert cfg.backend.name == "fsdp" and cfg.rl.resume is True
    assert cfg.run_dir == f"{tmp_path}/runs/rl-4242"

    # Overrides given win over the defaults (no key twice); the environment picks the rest.
    env.update(
        GPUS_PER_NODE="2", RDZV_PORT="31000", TORCHRUN="/venv/bin/python -m torch.distributed.run"
    )
    proc = dry_run(["backend=fsdp", "run_dir=/shared/runs/a", "rl.resume=false"], env)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[4:7] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in argv and "--rdzv_endpoint=node01:31000" in argv
    assert argv[argv.index("alignkit.cli") + 1 :] == [
        "backend=fsdp",
        "run_dir=/shared/runs/a",
        "rl.resume=false",
    ]

    # Outside a SLURM job it refuses, naming what is missing.
    bare = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    proc = dry_run(["stage=rl"], bare)
    assert proc.returncode != 0 and "not inside a SLURM job" in proc.stderr


@pytest.mark.slow  # ~17-20 s: a 2-node launch like the rendezvous test's, via the script
def test_slurm_script_runs_on_two_simulated_nodes(
    two_ranks: Path, sft_run: Path, tmp_path: Path
) -> None:
    """The script under stand-ins for srun and scontrol, each node's torchrun agent
    meeting at the first node (127.0.0.1), the default run_dir under the submit dir."""
    env = slurm_env(
        fake_slurm_bin(tmp_path / "bin", "127.0.0.1"),
        tmp_path,
        GPUS_PER_NODE="1",
        RDZV_PORT=str(free_port()),
        TORCHRUN=f"{sys.executable} -m torch.distributed.run",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT), *rl_args(sft_run)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "runs" / "rl-4242"
    # rl.resume=true found no checkpoint and started from step 0; the run is the reference's.
    got = read_metrics(run_dir / "metrics.jsonl")
    assert [untimed(r) for r in got] == [
        untimed(r) for r in read_metrics(two_ranks / "metrics.jsonl")
    ]


# ---------------------------------------------------------------------------------------------
# checkpoints resumed on another number of ranks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed_on_one_rank(
    two_ranks: Path, sft_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """The 2-rank run cut after its step-2 checkpoint, resumed to the end on 1 FSDP rank."""
    run_dir = truncated_copy(two_ranks, tmp_path_factory.mktemp("one_rank") / "run", 2)
    args = [*rl_args(sft_run), "backend=fsdp", "rl.resume=true", f"run_dir={run_dir}"]
    return run_dir, torchrun(["--standalone", "--nproc_per_node=1"], args)


def test_two_rank_checkpoint_resumes_on_one_rank(
    resumed_on_one_rank: tuple[Path, str], two_ranks: Path
) -> None:
    """~11 s (the fixture's 1-rank launch): DCP reshards policy and optimizer from 2 shards
    to 1."""
    run_dir, stderr = resumed_on_one_rank
    assert "resumed from" in stderr and "at step 2" in stderr
    assert_kept(run_dir, two_ranks, before=2)
    assert_same_trajectory(run_dir, two_ranks)
    assert_close_weights(run_dir, two_ranks, steps=STEPS - 2)
    ckpt = run_dir / "rl" / "checkpoints" / "step_000004"
    assert json.loads((ckpt / "state.json").read_text())["world_size"] == 1
    assert [p.name for p in ckpt.glob("rng_rank*.pt")] == ["rng_rank0.pt"]


@pytest.mark.slow  # ~23-27 s: a 1-rank resume (~11 s, shared fixture), a 2-rank one (12-16 s)
def test_one_rank_checkpoint_resumes_on_two_ranks(
    resumed_on_one_rank: tuple[Path, str], two_ranks: Path, sft_run: Path, tmp_path: Path
) -> None:
    """The 1-rank run's step-4 checkpoint (1 shard, no rng_rank1.pt) back on 2 ranks."""
    run_dir = truncated_copy(resumed_on_one_rank[0], tmp_path / "run", 4)
    args = [*rl_args(sft_run), "backend=fsdp", "rl.resume=true", f"run_dir={run_dir}"]
    stderr = torchrun(["--standalone", "--nproc_per_node=2"], args)
    assert "resumed from" in stderr and "at step 4" in stderr
    assert_kept(run_dir, resumed_on_one_rank[0], before=4)
    assert_same_trajectory(run_dir, two_ranks)
    assert_close_weights(run_dir, two_ranks, steps=STEPS - 2)


def test_two_rank_checkpoint_resumes_on_the_cpu_backend(
    two_ranks: Path, sft_run: Path, tmp_path: Path
) -> None:
    """~7-10 s: one plain process (backend=cpu) continuing the 2-rank run from step 2."""
    run_dir = truncated_copy(two_ranks, tmp_path / "run", 2)
    proc = run_cli([*rl_args(sft_run), "rl.resume=true", f"run_dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_kept(run_dir, two_ranks, before=2)
    assert_same_trajectory(run_dir, two_ranks)
    assert_close_weights(run_dir, two_ranks, steps=STEPS - 2)
