"""docs/hooks.md stays in sync with the hook specs and the Rollout and RunContext fields."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignkit import hookspecs
from alignkit.batch import Rollout
from alignkit.context import RunContext

DOCS = Path(__file__).resolve().parents[1] / "docs"
HOOKS_MD = DOCS / "hooks.md"

_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
_HOOK_HEADING = re.compile(r"^`(\w+)`$")
_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")


def _hook_specs() -> dict[str, Callable[..., Any]]:
    """Functions of alignkit.hookspecs marked as hook specs, by name."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: func
        for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(func, marker)
    }


def _markdown_lines() -> list[str]:
    return HOOKS_MD.read_text(encoding="utf-8").splitlines()


def _code_blocks(lines: list[str]) -> list[tuple[str, str]]:
    """(language, text) of each fenced code block in ``lines``."""
    blocks: list[tuple[str, str]] = []
    fence: str | None = None
    lang, body = "", []
    for line in lines:
        match = _FENCE.match(line.strip())
        if fence is None:
            if match:
                fence, lang, body = match.group(1), match.group(2), []
        elif line.strip() == fence:
            blocks.append((lang, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    return blocks


def _hook_sections() -> dict[str, list[str]]:
    """Hook name -> the lines of its section (a heading that is just the name in backticks)."""
    lines = _markdown_lines()
    headings: list[tuple[int, int, str]] = []  # (line index, level, text)
    in_code = False
    for i, line in enumerate(lines):
        if _FENCE.match(line.strip()):
            in_code = not in_code
        match = None if in_code else _HEADING.match(line)
        if match:
            headings.append((i, len(match.group(1)), match.group(2)))
    sections: dict[str, list[str]] = {}
    for n, (start, level, text) in enumerate(headings):
        hook = _HOOK_HEADING.match(text)
        if not hook:
            continue
        end = next((i for i, lvl, _ in headings[n + 1 :] if lvl <= level), len(lines))
        name = hook.group(1)
        assert name not in sections, f"docs/hooks.md has two sections for `{name}`"
        sections[name] = lines[start + 1 : end]
    return sections


def _cells(row: str) -> list[str]:
    """Cells of a markdown table row; ``\\|`` inside a cell is not a separator."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _python_blocks(section: list[str]) -> list[str]:
    return [text for lang, text in _code_blocks(section) if lang in ("python", "py")]


def _is_hookimpl(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Name) and target.id == "hookimpl") or (
        isinstance(target, ast.Attribute) and target.attr == "hookimpl"
    )


SPECS = _hook_specs()
SECTIONS = _hook_sections()
# Sections that are not hook sections but are named like a type, e.g. `Rollout`.
TYPE_SECTIONS = {"Rollout", "RunContext"}


def test_hookspecs_are_found() -> None:
    assert {"rollout", "reward", "advantage", "update", "register_configs"} <= set(SPECS)


def test_every_documented_hook_exists() -> None:
    documented = set(SECTIONS) - TYPE_SECTIONS
    stale = sorted(documented - set(SPECS))
    assert not stale, f"docs/hooks.md documents hooks that no longer exist: {stale}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_has_a_section_with_its_signature(name: str) -> None:
    assert name in SECTIONS, f"hook {name!r} has no section (### `{name}`) in docs/hooks.md"
    blocks = _python_blocks(SECTIONS[name])
    assert blocks, f"section `{name}` has no python code block"
    signature = blocks[0].strip()
    spec = inspect.signature(SPECS[name])
    assert re.search(rf"\bdef {name}\(", signature), f"`{name}`: first block is not its def"
    for param in spec.parameters:
        assert re.search(rf"\b{param}\b", signature), f"`{name}`: parameter {param!r} missing"
    # The block is the spec's signature copied exactly: same names, annotations and return.
    parsed = ast.parse(signature + ("" if signature.endswith(":") else ":") + " ...").body
    assert len(parsed) == 1 and isinstance(parsed[0], ast.FunctionDef)
    func = parsed[0]
    assert func.name == name
    documented = [
        (a.arg, ast.unparse(a.annotation) if a.annotation else None) for a in func.args.args
    ]
    expected = [(p.name, p.annotation) for p in spec.parameters.values()]
    assert documented == expected, f"`{name}`: documented parameters differ from the spec"
    returns = ast.unparse(func.returns) if func.returns else None
    assert returns == spec.return_annotation, f"`{name}`: documented return type differs"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_section_states_how_results_are_combined(name: str) -> None:
    assert name in SECTIONS, f"hook {name!r} has no section in docs/hooks.md"
    text = "\n".join(SECTIONS[name])
    firstresult = getattr(SPECS[name], f"{hookspecs.PROJECT}_spec")["firstresult"]
    expected = "**Result:** firstresult" if firstresult else "**Result:** collected"
    assert expected in text, f"section `{name}` must say {expected!r}"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hook_section_has_an_example_implementation(name: str) -> None:
    assert name in SECTIONS, f"hook {name!r} has no section in docs/hooks.md"
    examples = _python_blocks(SECTIONS[name])[1:]
    found = False
    for example in examples:
        for node in ast.walk(ast.parse(example)):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                found = found or any(_is_hookimpl(d) for d in node.decorator_list)
    assert found, f"section `{name}` has no example `@hookimpl def {name}(...)`"


def test_every_python_block_is_valid_python() -> None:
    signatures = {blocks[0] for name in SPECS if (blocks := _python_blocks(SECTIONS.get(name, [])))}
    for lang, text in _code_blocks(_markdown_lines()):
        if lang not in ("python", "py") or text in signatures:
            continue
        ast.parse(text)


def _table_rows(heading: str) -> dict[str, str]:
    """First-column name -> the whole row, for the table in the section titled ``heading``."""
    assert heading in SECTIONS, f"docs/hooks.md has no section titled {heading}"
    rows: dict[str, str] = {}
    for line in SECTIONS[heading]:
        if line.lstrip().startswith("|") and (m := re.fullmatch(r"`(\w+)`", _cells(line)[0])):
            rows[m.group(1)] = line
    return rows


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    class_def = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(class_def, ast.ClassDef)
    body = class_def.body
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                doc = str(after.value.value)
            docs[node.target.id] = doc
    return docs


def test_every_rollout_field_is_in_the_table() -> None:
    rows = _table_rows("Rollout")
    names = [f.name for f in dataclasses.fields(Rollout)]
    missing = [n for n in names if n not in rows]
    assert not missing, f"Rollout fields missing from the docs table: {missing}"
    stale = sorted(set(rows) - set(names))
    assert not stale, f"the Rollout table documents fields that do not exist: {stale}"


def test_rollout_table_shapes_match_batch_py() -> None:
    rows = _table_rows("Rollout")
    for name, doc in _field_docs(Rollout).items():
        match = re.search(r"(\([A-Z, ]*\))\s+(int64|float32|bool)", doc)
        if match is None or name not in rows:  # a missing row is reported by the test above
            continue
        shape, dtype = match.groups()
        cells = _cells(rows[name])
        assert shape in cells[1], f"Rollout.{name}: batch.py says {shape}, docs say {cells[1]}"
        assert cells[2] == dtype, f"Rollout.{name}: batch.py says {dtype}, docs say {cells[2]}"


def test_every_run_context_field_is_in_the_table() -> None:
    rows = _table_rows("RunContext")
    names = [f.name for f in dataclasses.fields(RunContext)]
    missing = [n for n in names if n not in rows]
    assert not missing, f"RunContext fields missing from the docs table: {missing}"
    stale = sorted(set(rows) - set(names))
    assert not stale, f"the RunContext table documents fields that do not exist: {stale}"
