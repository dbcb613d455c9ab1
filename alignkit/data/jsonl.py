"""JSONL readers. Every error names the file, the line and, where it applies, the field."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from alignkit.errors import DataError


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; records must be JSON objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def require_str(
    record: Mapping[str, Any], key: str, where: str, *, allow_empty: bool = False
) -> str:
    """``record[key]`` as a string; the error names ``where`` (``file:line``) and the field."""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def read_sft_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Demonstrations ``{"prompt": ..., "response": ...}``: the prompt as the model sees it."""
    pairs = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        pairs.append((require_str(record, "prompt", where), require_str(record, "response", where)))
    if not pairs:
        raise DataError(f"{path}: no records")
    return pairs


def read_prompt_records(path: str | Path, record_type: Any) -> list[Any]:
    """Task prompt records, built with ``record_type.from_dict``; errors name file and line."""
    records = []
    for lineno, record in read_jsonl(path):
        try:
            records.append(record_type.from_dict(record))
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{path}:{lineno}: {exc}") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records
