"""Judge prompt templates: YAML files in ``conf/prompts/``, never strings in code.

A template file holds the judge's principles (its "constitution", Bai et al. 2022) and the
texts the judge sees::

    principles:                  # name, text and weight of each principle
      - {name: helpful, text: "The answer is right.", weight: 0.6}
    single: "Principles: {principles}\\n{prompt} {response}\\nCritique:"
    pairwise: "...{prompt}\\nResponse A: {response_a}\\nResponse B: {response_b}\\nCritique:"
    revision: "{prompt} {response}\\nCritique: {critique}\\nRevision:"
    verdict: "\\nVerdict:"       # appended after the critique; the verdict option follows
    verdicts: {" good": 1.0, " bad": 0.0}
    pairwise_verdicts: {" A": 1.0, " B": 0.0}
    system: "..."                # the system message for chat endpoints (optional)

``template=NAME`` loads ``conf/prompts/NAME.yaml`` (shipped with alignkit); a path loads that
file. Placeholders are checked when the file is loaded, so a typo fails before any judging.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alignkit.data.jsonl import decode_lines
from alignkit.errors import ConfigError

__all__ = ["JudgeTemplate", "Principle", "load_template"]

_FIELDS: dict[str, set[str]] = {
    "single": {"principles", "prompt", "response"},
    "pairwise": {"principles", "prompt", "response_a", "response_b"},
    "revision": {"principles", "prompt", "response", "critique"},
}


@dataclass(frozen=True)
class Principle:
    """One principle the judge critiques against, with its weight in the combined score."""

    name: str
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class JudgeTemplate:
    """The prompts of one judge and the verdict options it answers with."""

    principles: tuple[Principle, ...]
    single: str
    pairwise: str
    revision: str
    verdict: str
    verdicts: dict[str, float]
    pairwise_verdicts: dict[str, float]
    system: str = ""
    principle_separator: str = " "
    source: str = field(default="", compare=False)

    def principles_text(self, principles: tuple[Principle, ...] | None = None) -> str:
        """The principles' texts joined for the ``{principles}`` placeholder."""
        return self.principle_separator.join(p.text for p in principles or self.principles)

    def render_single(self, prompt: str, response: str, principles: tuple[Principle, ...]) -> str:
        text = self.principles_text(principles)
        return self.single.format(principles=text, prompt=prompt, response=response.strip())

    def render_pairwise(
        self, prompt: str, a: str, b: str, principles: tuple[Principle, ...]
    ) -> str:
        return self.pairwise.format(
            principles=self.principles_text(principles),
            prompt=prompt,
            response_a=a.strip(),
            response_b=b.strip(),
        )

    def render_revision(
        self, prompt: str, response: str, critique: str, principles: tuple[Principle, ...]
    ) -> str:
        return self.revision.format(
            principles=self.principles_text(principles),
            prompt=prompt,
            response=response.strip(),
            critique=critique.strip(),
        )


def _placeholders(text: str, where: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{where}: malformed template: {exc}") from None


def _check_text(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: key {key!r} must be a non-empty string")
    unknown = _placeholders(value, f"{where}: {key}") - _FIELDS.get(key, set())
    if unknown:
        allowed = ", ".join(sorted(_FIELDS.get(key, set()))) or "none"
        raise ConfigError(
            f"{where}: {key} uses unknown placeholders {sorted(unknown)}; allowed: {allowed}"
        )
    return value


def _check_options(raw: dict[str, Any], key: str, where: str) -> dict[str, float]:
    value = raw.get(key)
    if not isinstance(value, dict) or len(value) < 2:
        raise ConfigError(f"{where}: {key} must map at least two verdict options to values")
    try:
        return {str(k): float(v) for k, v in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} values must be numbers, got {value}") from None


def parse_principles(raw: Any, where: str) -> tuple[Principle, ...]:
    """Principles from a list of ``{name, text, weight}`` mappings (config or template)."""
    if not isinstance(raw, list | tuple) or not raw:
        raise ConfigError(f"{where}: principles must be a non-empty list of {{name, text, weight}}")
    out = []
    for i, item in enumerate(raw):
        if not hasattr(item, "get") or not item.get("name") or not item.get("text"):
            raise ConfigError(f"{where}: principles[{i}] needs a name and a text")
        weight = float(item.get("weight", 1.0))
        if weight < 0:
            raise ConfigError(f"{where}: principles[{i}].weight must be >= 0, got {weight}")
        out.append(Principle(str(item["name"]), str(item["text"]), weight))
    if len({p.name for p in out}) != len(out):
        raise ConfigError(f"{where}: principle names must be unique")
    if sum(p.weight for p in out) <= 0:
        raise ConfigError(f"{where}: principle weights must have a positive sum")
    return tuple(out)


def _read(name_or_path: str) -> tuple[str, str]:
    """(text, where) of a template name (``conf/prompts/<name>.yaml``) or a file path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"judge template file not found: {path}")
        # Line by line so that bad UTF-8 is an error naming the file and line, not a traceback.
        lines = decode_lines(path, lambda n: f"{path}:{n}")
        return "".join(line for _, line in lines), str(path)
    bundled = resources.files("alignkit.conf").joinpath("prompts", f"{name_or_path}.yaml")
    if not bundled.is_file():
        known = sorted(
            p.name.removesuffix(".yaml")
            for p in resources.files("alignkit.conf").joinpath("prompts").iterdir()
            if p.name.endswith(".yaml")
        )
        raise ConfigError(
            f"unknown judge template {name_or_path!r}; bundled templates: {', '.join(known)} "
            "(or give a path to a .yaml file)"
        )
    return bundled.read_text(encoding="utf-8"), f"conf/prompts/{name_or_path}.yaml"


def load_template(name_or_path: str) -> JudgeTemplate:
    """Load and check a judge template (see the module docstring for the keys)."""
    text, where = _read(name_or_path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of template keys")
    known = {*_FIELDS, "principles", "verdict", "verdicts", "pairwise_verdicts", "system"}
    known.add("principle_separator")
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    verdict = raw.get("verdict")
    if not isinstance(verdict, str) or not verdict.strip():
        raise ConfigError(f"{where}: key 'verdict' must be the text that precedes the verdict")
    return JudgeTemplate(
        principles=parse_principles(raw.get("principles"), f"{where}: principles"),
        single=_check_text(raw, "single", where),
        pairwise=_check_text(raw, "pairwise", where),
        revision=_check_text(raw, "revision", where),
        verdict=verdict,
        verdicts=_check_options(raw, "verdicts", where),
        pairwise_verdicts=_check_options(raw, "pairwise_verdicts", where),
        system=str(raw.get("system") or ""),
        principle_separator=str(raw.get("principle_separator", " ")),
        source=where,
    )
