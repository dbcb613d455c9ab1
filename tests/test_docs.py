"""docs/hooks.md stays in sync with the hook specs and the Rollout and RunContext fields, and
docs/plugin-api.md with the public plugin API (every exported name, with its signature)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from alignkit import AlgorithmNeeds, ComponentRegistry, hookspecs
from alignkit.batch import Rollout
from alignkit.context import RunContext
from alignkit.rl import Counts, PolicyLossSpec

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


# ---------------------------------------------------------------------------------------------
# docs/plugin-api.md: the public plugin API, every name documented with its signature
# ---------------------------------------------------------------------------------------------

PLUGIN_API_MD = DOCS / "plugin-api.md"
PUBLIC_MODULES = {
    name: importlib.import_module(name) for name in ("alignkit", "alignkit.rl", "alignkit.rl.ops")
}
"""The modules whose ``__all__`` is the documented plugin API."""
OWNERS: dict[str, type] = {
    "ctx": RunContext,
    "batch": Rollout,
    "Rollout": Rollout,
    "registry": ComponentRegistry,
    "counts": Counts,
    "needs": AlgorithmNeeds,
    "PolicyLossSpec": PolicyLossSpec,
}
"""How plugin-api.md names an object's attribute: ``ctx.sample(...)``, ``batch.select(...)``."""
IN_HOOKS_MD = {"num_rows", "group_size", "sequences", "validate", "is_main_process", "stage_dir"}
"""Members of Rollout and RunContext documented in hooks.md rather than plugin-api.md."""
_SPAN = re.compile(r"`([^`]+)`")


def _prose_lines(path: Path) -> list[str]:
    """The lines of ``path`` outside fenced code blocks."""
    out, fence = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        match = _FENCE.match(line.strip())
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            out.append(line)
    return out


def _bullets(path: Path) -> list[str]:
    """Every ``- ...`` bullet of ``path`` outside code, its indented continuation joined."""
    bullets: list[str] = []
    for line in _prose_lines(path):
        if line.startswith("- "):
            bullets.append(line[2:])
        elif bullets and line.startswith("  ") and line.strip():
            bullets[-1] += " " + line.strip()
        else:
            bullets.append("") if bullets and bullets[-1] else None
    return [b for b in bullets if b]


def _leading_spans(bullet: str) -> list[str]:
    """The code spans a bullet starts with: `a(...)`, `b` and `c` -> [a(...), b, c]."""
    spans, rest = [], bullet
    while match := _SPAN.match(rest):
        spans.append(match.group(1))
        rest = rest[match.end() :]
        separator = re.match(r"(,\s*|\s+and\s+)(?=`)", rest)
        if separator is None:
            break
        rest = rest[separator.end() :]
    return spans


def _split_entry(span: str) -> tuple[str, str | None]:
    """``name(params) -> ret`` -> (name, params); (name, None) without parentheses."""
    match = re.match(r"[\w.]+", span)
    assert match is not None, span
    name, rest = match.group(0), span[match.end() :]
    if not rest.startswith("("):
        return name, None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return name, rest[1:i]
    raise AssertionError(f"unbalanced parentheses in `{span}`")


API_ENTRIES: dict[str, str | None] = {}
for _bullet in _bullets(PLUGIN_API_MD):
    for _span in _leading_spans(_bullet):
        _name, _params = _split_entry(_span)
        API_ENTRIES.setdefault(_name, _params)


def _public_names() -> list[tuple[str, str]]:
    return [(module, name) for module, mod in PUBLIC_MODULES.items() for name in mod.__all__]


def _resolve(entry: str) -> Any:
    """The object a documented entry names (a public name, or ``owner.attribute``)."""
    if "." in entry:
        owner, attr = entry.split(".", 1)
        return getattr(OWNERS[owner], attr)
    for mod in PUBLIC_MODULES.values():
        if entry in mod.__all__:
            return getattr(mod, entry)
    raise KeyError(entry)


def _kind(kind: inspect._ParameterKind) -> str:
    return {
        inspect.Parameter.KEYWORD_ONLY: "keyword-only",
        inspect.Parameter.VAR_POSITIONAL: "*args",
        inspect.Parameter.VAR_KEYWORD: "**kwargs",
    }.get(kind, "positional")


def _actual_parameters(obj: Any) -> list[tuple[str, str, bool]]:
    """(name, kind, has a default) of each parameter a caller passes (no self)."""
    params = list(inspect.signature(obj).parameters.values())
    if inspect.isfunction(obj) and params and params[0].name == "self":
        params = params[1:]  # a method looked up on its class
    return [
        # omegaconf's MISSING ("???") marks a required field of a config dataclass
        (p.name, _kind(p.kind), p.default is not inspect.Parameter.empty and p.default != "???")
        for p in params
    ]


def _documented_parameters(params: str) -> list[tuple[str, str, bool]]:
    args = ast.parse(f"def f({params}): pass").body[0].args  # type: ignore[attr-defined]
    positional = args.posonlyargs + args.args
    first_default = len(positional) - len(args.defaults)
    out = [(a.arg, "positional", i >= first_default) for i, a in enumerate(positional)]
    if args.vararg:
        out.append((args.vararg.arg, "*args", False))
    out += [
        (a.arg, "keyword-only", d is not None)
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    if args.kwarg:
        out.append((args.kwarg.arg, "**kwargs", False))
    return out


@pytest.mark.parametrize(("module", "name"), _public_names())
def test_every_public_name_is_in_plugin_api_md(module: str, name: str) -> None:
    assert name in API_ENTRIES, (
        f"{module}.{name} is exported but docs/plugin-api.md has no bullet starting `{name}`"
    )
    obj = getattr(PUBLIC_MODULES[module], name)
    if inspect.isfunction(obj):
        assert API_ENTRIES[name] is not None, f"`{name}` is documented without its parameters"


@pytest.mark.parametrize("entry", sorted(e for e, p in API_ENTRIES.items() if p is not None))
def test_documented_signatures_match_the_code(entry: str) -> None:
    try:
        obj = _resolve(entry)
    except (KeyError, AttributeError):
        pytest.fail(f"docs/plugin-api.md documents `{entry}(...)`, which does not exist")
    documented = _documented_parameters(API_ENTRIES[entry] or "")
    assert documented == _actual_parameters(obj), f"`{entry}`: parameters differ from the code"


def test_the_run_context_and_rollout_calls_are_documented() -> None:
    def members(cls: type) -> set[str]:
        return {
            n
            for n, v in vars(cls).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, property | classmethod))
        }

    expected = {f"ctx.{n}" for n in members(RunContext) - IN_HOOKS_MD}
    expected |= {"ctx.artifacts", "ctx.prompt_sampler", "batch.kl", "Rollout.cat"}
    expected |= {f"batch.{n}" for n in members(Rollout) - IN_HOOKS_MD - {"cat"}}
    missing = sorted(expected - set(API_ENTRIES))
    assert not missing, f"docs/plugin-api.md has no bullet for {missing}"


def test_every_needs_field_is_documented_with_its_default() -> None:
    for f in dataclasses.fields(AlgorithmNeeds):
        assert f.name in API_ENTRIES, f"AlgorithmNeeds.{f.name} is not in docs/plugin-api.md"
        if f.default is not dataclasses.MISSING:
            default = repr(f.default).replace("'", '"')
        else:
            default = repr(f.default_factory())  # type: ignore[misc]
        bullet = next(b for b in _bullets(PLUGIN_API_MD) if b.startswith(f"`{f.name}`"))
        assert f"(default `{default}`)" in bullet, f"AlgorithmNeeds.{f.name}: default {default}"


def _python_examples(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [text for lang, text in _code_blocks(lines) if lang in ("python", "py")]


@pytest.mark.parametrize("index", range(len(_python_examples(PLUGIN_API_MD))))
def test_plugin_api_examples_run_and_import_only_the_public_api(index: int) -> None:
    from tests.test_tutorial import private_imports

    source = _python_examples(PLUGIN_API_MD)[index]
    problems, _ = private_imports(source)
    assert not problems, f"example {index} imports outside the public API: {problems}"
    module = types.ModuleType(f"plugin_api_example_{index}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(source, f"docs/plugin-api.md example {index}", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]


def test_the_gspo_example_is_the_external_plugin() -> None:
    fixture = DOCS.parent / "tests" / "fixtures" / "external" / "alignkit-gspo" / "alignkit_gspo.py"
    body = fixture.read_text(encoding="utf-8").split("from __future__ import annotations\n", 1)[1]
    examples = [e.strip() for e in _python_examples(PLUGIN_API_MD)]
    assert body.strip() in examples, "the GSPO example differs from tests/fixtures/external"


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    for line in _prose_lines(path):
        if match := _HEADING.match(line):
            slug, n = _slug(match.group(2)), 1
            while slug in anchors:
                slug, n = f"{_slug(match.group(2))}-{n}", n + 1
            anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", ["plugin-api.md", "hooks.md", "tutorial.md", "README.md"])
def test_links_between_the_plugin_docs_resolve(doc: str) -> None:
    text = "\n".join(_prose_lines(DOCS / doc))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        file, _, anchor = target.partition("#")
        path = DOCS / file if file else DOCS / doc
        assert path.is_file(), f"{doc} links to {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc} links to {target}: no such heading"
