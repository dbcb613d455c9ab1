"""JSONL readers. Every error names the file, the line and, where it applies, the field."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from alignkit.errors import DataError


def decode_lines(path: Path, where: Callable[[int], str]) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of each line of a UTF-8 file.

    Bad UTF-8 is a DataError at ``where(line)`` naming the byte, its column and its offset in
    the file (what ``xxd``/``hexdump`` shows), rather than a bare ``UnicodeDecodeError`` that
    names neither file nor line. A byte-order mark on the first line is dropped.
    """
    offset = 0  # bytes before the current line, for the file offset in the message
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line drops the byte-order mark spreadsheet tools write.
                yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where(lineno)}: not valid UTF-8 (byte {raw[exc.start]:#04x} at column "
                    f"{exc.start + 1}, file offset {offset + exc.start}); save the file as UTF-8"
                ) from None
            offset += len(raw)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line; records must be JSON objects."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    for lineno, line in decode_lines(path, lambda n: f"{path}:{n}"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
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
