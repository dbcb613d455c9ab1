"""The architecture as rules: no import cycles, an RL core that imports no stage, task or CLI
code, no plugin name in alignkit's own code, and phase hooks that do what their specs say."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import tomllib

from .conftest import REPO, SMOKE, cli_env, run_cli

PACKAGE = REPO / "alignkit"
RL_CORE = (
    "alignkit.batch",
    "alignkit.context",
    "alignkit.engine",
    "alignkit.hookspecs",
    "alignkit.needs",
    "alignkit.plugins",
    "alignkit.registry",
    "alignkit.rl",
    "alignkit.rewards",
    "alignkit.rollout",
)
"""Module prefixes of the contract, the loop and the RL machinery."""
OUTSIDE_THE_CORE = (
    "alignkit.stages",
    "alignkit.tasks",
    "alignkit.cli",
    "alignkit.cli.compare",
    "alignkit.cli.export",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imported(path: Path, name: str, everywhere: bool) -> set[str]:
    """Modules ``path`` imports: at module level (``TYPE_CHECKING`` blocks included), or with
    ``everywhere`` also inside functions."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    # A lazy package (PEP 562) names its re-exports under TYPE_CHECKING for type checkers
    # only: its submodules load on first use, so those are no dependency of the package.
    lazy = path.name == "__init__.py" and any(
        isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body
    )
    body = [n for n in tree.body if not (lazy and _is_type_checking(n))]
    nodes = ast.walk(tree) if everywhere else _module_level(body)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            out += _module_level(node.body) + _module_level(getattr(node, "orelse", []))
    return out


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _with_parents(module: str) -> set[str]:
    """``module`` and the packages above it but the root: importing ``a.b.c`` runs
    ``a/b/__init__.py`` first, so a package's eager imports are part of every import below
    it (the root package's are the public API, imported before anything else)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}


def import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        targets = {_resolve(t, modules) for t in _imported(path, name, everywhere)}
        expanded = {p for t in targets if t for p in _with_parents(t)}
        own = _with_parents(name)
        graph[name] = {t for t in expanded if t not in own}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycles() -> None:
    """Module-level imports, those under ``TYPE_CHECKING`` included (a function may import
    lazily: that is not a dependency of the module), and the packages each import runs."""
    assert cycles(import_graph()) == []


IMPORT_EACH = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("alignkit", "alignkit_plugins")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first() -> None:
    """Each module imported before any other of alignkit (their modules dropped between
    imports, in one interpreter): no import order hides a cycle."""
    import subprocess
    import sys

    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *names], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_the_rl_core_imports_no_stage_task_or_cli_code() -> None:
    graph = import_graph(everywhere=True)
    for module, targets in sorted(graph.items()):
        if not module.startswith(RL_CORE):
            continue
        bad = sorted(t for t in targets if t.startswith(OUTSIDE_THE_CORE))
        assert not bad, f"{module} imports {bad}"


def _plugin_names() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return sorted(project["project"]["entry-points"]["alignkit"])


CONCEPTS = {"gold", "feedback", "critique"}
"""Plugin names that are also the words for a concept of the core (the gold oracle of a
task, human feedback, a judge's critique); the test looks for them as plugin lookups only."""
CONFIG_SCHEMAS = {"config.py", "preference_config.py"}
"""Config schemas name default components, as the config files do."""


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String literals of ``path`` that are not docstrings."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(getattr(node, "body", None), list)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    for node in ast.walk(tree):
        for stmt in getattr(node, "body", []) if isinstance(node, ast.ClassDef) else []:
            if isinstance(stmt, ast.Expr):
                docs.add(id(stmt.value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    ]


def test_no_plugin_name_in_alignkits_own_code() -> None:
    """A plugin name as a value (``"rm_ensemble"``), a state key (``"ppo/value"``) or a
    setting (``algorithm=ppo``, ``reward.bradley_terry``) in code would tie the core to it."""
    names = [n for n in _plugin_names() if n not in CONCEPTS and n != "core"]
    assert {"ppo", "grpo", "rm_ensemble", "bradley_terry", "vllm"} <= set(names)
    alts = "|".join(names)
    lookup = re.compile(rf"^({alts})$|^({alts})/|algorithm=({alts})\b|reward\.({alts})\b")
    found = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in CONFIG_SCHEMAS
        for line, text in _code_strings(path)
        if lookup.search(text.strip())
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "extra",
    [
        [],  # the smoke budget: several minibatches, the critic learns with the policy
        ["algorithm.ppo_epochs=1", "algorithm.minibatch_size=64"],  # one-forward critic
        ["algorithm.value_model=shared"],
    ],
    ids=["separate", "separate-one-forward", "shared"],
)
def test_ppo_phases_do_what_their_specs_say(
    sft_run: Path, tmp_path: Path, extra: list[str]
) -> None:
    log = tmp_path / "phases.jsonl"
    args = [
        "stage=rl",
        "algorithm=ppo",
        *SMOKE,
        "reward=[gold]",
        "plugins=[phase_check]",
        f"model.path={sft_run / 'sft'}",
        f"run_dir={tmp_path / 'run'}",
        *extra,
    ]
    env = cli_env(
        ALIGNKIT_PLUGINS="phase_check=phase_checker",
        PYTHONPATH=str(REPO / "tests"),
        PHASE_LOG=str(log),
    )
    proc = run_cli(args, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["phase"] for r in records] == ["rollout", "reward", "advantage", "update"] * 3
    for r in records:
        if r["phase"] == "update":
            # the policy's optimizer and, for a separate critic, the critic's
            assert r["weights_changed"] and r["optimizer_steps"] >= 1, r
        else:
            assert not r["weights_changed"] and r["optimizer_steps"] == 0, r
    if extra[:1] == ["algorithm.ppo_epochs=1"]:
        # one policy step and one critic step per RL step, both in update
        assert {r["optimizer_steps"] for r in records if r["phase"] == "update"} == {2}
