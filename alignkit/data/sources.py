"""Where user data comes from: files, saved ``datasets`` folders and cached hub datasets.

:func:`read_records` turns a source into ``(where, record)`` pairs, ``where`` locating the record
for error messages; the ``load_*`` functions parse every record into the standard formats of
:mod:`alignkit.data.formats`.

==========================================  ===============================  =====================
source                                      read with                        ``where``
==========================================  ===============================  =====================
``*.jsonl`` (or ``*.ndjson``)               one JSON object a line           ``path:LINE``
``*.json``                                  a list of objects, ``{"data":    ``path:record N``
                                            [...]}``, or JSON lines          (``path:line N``)
``*.parquet``                               pyarrow                          ``path:row N``
``*.csv``                                   ``csv`` (JSON cells parsed)      ``path:line N``
folder from ``save_to_disk``                ``datasets.load_from_disk``      ``path[split]:row N``
``owner/name`` or ``name`` (``:config``)    ``datasets.load_dataset``        ``name[split]:row N``
==========================================  ===============================  =====================

Rows and records count from 1; CSV lines count the header as line 1. A hub dataset must be in
the local cache when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set: then no request goes to
the network at all, and a dataset missing from the cache fails at once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from alignkit.data.feedback import is_dataset_dir
from alignkit.data.formats import (
    Example,
    Preference,
    Prompt,
    Unpaired,
    check_columns,
    parse_example,
    parse_preference,
    parse_prompt,
    parse_unpaired,
)
from alignkit.data.jsonl import decode_lines
from alignkit.errors import ConfigError, DataError

T = TypeVar("T")
Record = tuple[str, dict[str, Any]]

FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
# owner/name or name, optionally :config; what the hub accepts as a dataset id.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_TRUE_ENV = ("1", "ON", "YES", "TRUE")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

# --------------------------------------------------------------------------------------------
# text files
# --------------------------------------------------------------------------------------------


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_lines(path: Path, where: Callable[[int], str]) -> Iterator[Record]:
    for lineno, line in decode_lines(path, where):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where(lineno)}: invalid JSON: {exc.msg}") from None
        yield where(lineno), _object(value, where(lineno))


def _read_jsonl(path: Path) -> Iterator[Record]:
    return _json_lines(path, lambda n: f"{path}:{n}")


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and "role" in value and "content" in value


def _json_records(path: Path, value: Any) -> list[Any]:
    """The records of a parsed ``.json`` document: a list, or the list a wrapper object holds.

    ``{"data": [{...}, ...]}`` wraps records; an object without such a list is one record
    (``{"messages": [...]}`` is one conversation, not a wrapper around its messages).
    """
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    lists = [
        k
        for k, v in value.items()
        if isinstance(v, list) and all(isinstance(i, dict) and not _is_message(i) for i in v)
    ]
    if len(lists) > 1:
        raise DataError(
            f"{path}: a JSON object with several lists of records ({', '.join(map(repr, lists))});"
            " expected a list of records or an object holding one"
        )
    return value[lists[0]] if lists else [value]


def _read_json(path: Path) -> Iterator[Record]:
    lines = decode_lines(path, lambda n: f"{path}:line {n}")
    text = "\n".join(line.rstrip("\r\n") for _, line in lines)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several documents: JSON lines saved as .json
            yield from _json_lines(path, lambda n: f"{path}:line {n}")
            return
        raise DataError(f"{path}:line {exc.lineno}: invalid JSON: {exc.msg}") from None
    for n, item in enumerate(_json_records(path, value), start=1):
        yield f"{path}:record {n}", _object(item, f"{path}:record {n}")


def _csv_cell(cell: str) -> Any:
    # Lists and objects (e.g. a messages column) are stored as JSON text in a CSV cell.
    if cell.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(cell)
        except json.JSONDecodeError:
            return cell  # text that merely starts with a bracket, e.g. "[INST] ..."
    return cell


def _read_csv(path: Path) -> Iterator[Record]:
    lines = (line for _, line in decode_lines(path, lambda n: f"{path}:line {n}"))
    reader = csv.reader(lines)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(f"{path}:line 1: invalid CSV: {exc}") from None
    end = reader.line_num
    while True:
        start = end + 1  # a quoted cell may span lines: a row is located by its first line
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:line {start}: invalid CSV: {exc}") from None
        end = reader.line_num
        if not row:
            continue
        where = f"{path}:line {start}"
        if len(row) != len(header):
            raise DataError(f"{where}: expected {len(header)} cells (the header's), got {len(row)}")
        yield where, {name: _csv_cell(cell) for name, cell in zip(header, row, strict=True)}


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    row = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


_READERS: dict[str, Callable[[Path], Iterator[Record]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}

# --------------------------------------------------------------------------------------------
# datasets: saved folders and the hub cache
# --------------------------------------------------------------------------------------------


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # an optional dependency of these sources, not of alignkit
        raise DataError("reading a datasets folder or hub dataset needs 'datasets'") from exc
    return datasets


def _rows(dataset: Iterable[Mapping[str, Any]], prefix: str) -> Iterator[Record]:
    for row, record in enumerate(dataset, start=1):
        yield f"{prefix}:row {row}", dict(record)


def _read_saved(path: Path, split: str | None) -> Iterator[Record]:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            available = ", ".join(loaded) or "none"
            raise DataError(f"{path}: no split {name!r}; available splits: {available}")
        return _rows(loaded[name], f"{path}[{name}]")
    own = str(loaded.split) if loaded.split is not None else None
    # A single Dataset has no splits to choose from: asking for one (say, a held-out "test")
    # and silently getting every row would mix training data into the evaluation.
    if split is not None and split != own:
        raise DataError(
            f"{path}: a single saved Dataset (split {own!r}) has no split {split!r}; "
            "omit split or save a DatasetDict"
        )
    return _rows(loaded, f"{path}[{own}]" if own else str(path))


def offline_requested() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks for no network access."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE_ENV for v in _OFFLINE_ENV)


@contextlib.contextmanager
def _offline_mode(datasets: Any) -> Iterator[None]:
    """Honour the offline variables even when they were set after ``datasets`` was imported.

    ``datasets`` and ``huggingface_hub`` read them once, at import; offline, ``load_dataset``
    skips the hub and reads its Arrow cache directly, so a missing dataset fails at once.
    """
    if not offline_requested():
        yield
        return
    import huggingface_hub.constants as hub_constants

    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _not_found(source: str, reason: str = "") -> DataError:
    detail = f" ({reason})" if reason else ""
    return DataError(
        f"{source}: neither an existing file/folder nor a dataset available offline in the "
        f"cache{detail}; data files must end with {', '.join(FILE_SUFFIXES)}"
    )


def _read_hub(source: str, split: str | None) -> Iterator[Record]:
    name, _, config = source.partition(":")
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        raise DataError(f"{source}: data file not found")  # never ask the hub about a path
    if not _HUB_NAME.fullmatch(name):
        raise _not_found(source)
    datasets = _datasets()
    name_split = split or "train"
    with _offline_mode(datasets):
        try:
            dataset = datasets.load_dataset(name, config or None, split=name_split)
        except ValueError as exc:  # the dataset is there; the split or config is not
            raise DataError(f"{source}: {exc}") from None
        except OSError as exc:  # ConnectionError (offline, unreachable), FileNotFoundError
            raise _not_found(source, f"{type(exc).__name__}: {exc}") from None
        except datasets.exceptions.DatasetsError as exc:  # found, but unreadable
            raise DataError(f"{source}: {type(exc).__name__}: {exc}") from None
    return _rows(dataset, f"{source}[{name_split}]")


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def read_records(source: str | Path, *, split: str | None = None) -> Iterator[Record]:
    """``(where, record)`` for every record of ``source``, in order (see the module table).

    The source is opened here, so a missing file or dataset fails at the call; a malformed
    line fails when iteration reaches it. ``split`` picks a split of a saved ``DatasetDict``
    or a hub dataset (default ``"train"``); a file has none.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if split is not None:
            raise DataError(f"{path}: a file has no splits (split={split!r})")
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r}; "
                f"expected one of {', '.join(FILE_SUFFIXES)}"
            )
        return reader(path)
    if path.is_dir():
        if not is_dataset_dir(path):
            raise DataError(
                f"{path}: a folder, but not a dataset saved with save_to_disk "
                "(no dataset_info.json or dataset_dict.json)"
            )
        return _read_saved(path, split)
    return _read_hub(str(source), split)


def _load(
    source: str | Path,
    split: str | None,
    columns: Mapping[str, str] | None,
    parse: Callable[[Mapping[str, Any], str, Mapping[str, str] | None], T],
) -> list[T]:
    mapping = check_columns(columns)  # a bad mapping fails before any data is read
    items = [parse(raw, where, mapping) for where, raw in read_records(source, split=split)]
    if not items:
        raise DataError(f"{source}{f'[{split}]' if split else ''}: no records")
    return items


def load_prompts(
    source: str | Path, *, split: str | None = None, columns: Mapping[str, str] | None = None
) -> list[Prompt]:
    """The prompt of every record (any standard kind); see :func:`~.formats.parse_prompt`."""
    return _load(source, split, columns, parse_prompt)


def load_examples(
    source: str | Path, *, split: str | None = None, columns: Mapping[str, str] | None = None
) -> list[Example]:
    """SFT demonstrations; see :func:`~alignkit.data.formats.parse_example`."""
    return _load(source, split, columns, parse_example)


def load_preferences(
    source: str | Path, *, split: str | None = None, columns: Mapping[str, str] | None = None
) -> list[Preference]:
    """Preference pairs, explicit or implicit prompt; see :func:`~.formats.parse_preference`."""
    return _load(source, split, columns, parse_preference)


def load_unpaired(
    source: str | Path, *, split: str | None = None, columns: Mapping[str, str] | None = None
) -> list[Unpaired]:
    """KTO-style labelled replies; see :func:`~alignkit.data.formats.parse_unpaired`."""
    return _load(source, split, columns, parse_unpaired)


def heldout_score(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from SHA-256 of ``f"{seed}/{key}"``: the same in every process."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_heldout(
    items: Sequence[T], fraction: float, seed: int, key: Callable[[T], str]
) -> tuple[list[T], list[T]]:
    """``(train, heldout)``: items whose key scores below ``fraction`` are held out.

    The score depends only on ``seed`` and the key, so an item (and every item sharing its key,
    e.g. all pairs of one prompt) lands on the same side whatever the order or the rest of the
    file. With >= 2 distinct keys both sides keep at least one key: the lowest-scoring key is
    held out if none was, the highest-scoring one kept if all were. Both lists keep input order.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ConfigError(f"heldout fraction must be a number in (0, 1), got {fraction!r}")
    if not (math.isfinite(fraction) and 0 < fraction < 1):
        raise ConfigError(f"heldout fraction must be in (0, 1), got {fraction!r}")
    keys = [key(item) for item in items]
    score = {k: heldout_score(seed, k) for k in keys}
    held = {k for k, s in score.items() if s < fraction}
    if len(items) >= 2:
        if len(score) < 2:
            raise DataError(
                f"cannot hold out part of {len(items)} items that all share the key {keys[0]!r}"
            )
        if not held:
            held = {min(score, key=score.__getitem__)}
        elif len(held) == len(score):
            held.discard(max(score, key=score.__getitem__))
    train = [item for item, k in zip(items, keys, strict=True) if k not in held]
    heldout = [item for item, k in zip(items, keys, strict=True) if k in held]
    return train, heldout
