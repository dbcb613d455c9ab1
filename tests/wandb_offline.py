"""Reading offline W&B runs back with no server: the run file's records, parsed with W&B's own
protobuf schema (the tests check what a run logged)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_BLOCK = 32 * 1024  # the W&B run file is a leveldb-style log of 32 KiB blocks
_HEADER = 7  # ":W&B" + magic (uint16) + version (uint8)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    """Raw protobuf records of a ``run-*.wandb`` file (a leveldb-style log of 32 KiB blocks)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # block trailer too small for a header: skip to the next block
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            break


def read_wandb_offline_run(run_file: Path) -> dict[str, Any]:
    """Run id, group, name, tags, config, history rows and summary of an offline run file."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "tags": []}
    for raw in _wandb_records(run_file):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name)
            out["tags"] = list(rec.run.tags)
            _apply_updates(out["config"], rec.run.config.update)
        elif kind == "config":
            _apply_updates(out["config"], rec.config.update)
        elif kind == "history":
            row = {
                (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                for i in rec.history.item
            }
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    out["config"] = {
        k: v.get("value", v) if isinstance(v, dict) else v for k, v in out["config"].items()
    }
    return out


def _apply_updates(target: dict[str, Any], updates: Any) -> None:
    for item in updates:
        target[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
