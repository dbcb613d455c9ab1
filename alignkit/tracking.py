"""Run tracking: JSONL metrics, ``summary.json``, console progress and Weights & Biases.

Every run writes ``metrics.jsonl`` (one JSON object per logged step) and ends by writing
``summary.json`` atomically into its run directory; these local files are the source of
truth, so comparisons work offline. W&B logs the same numbers. Without an API key it runs in
offline mode (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later); the resolved
config is logged with secrets redacted.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from alignkit.io import atomic_write_text

console = Console(stderr=True)

RUN_ID_FILE = "wandb_run_id"
STAGES = ("sft", "feedback", "reward_model", "rl", "eval")
"""Stages whose metrics W&B plots against their own ``<stage>/step`` axis."""

_SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|authorization)", re.I)
REDACTED = "***"


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config where values of secret-looking keys are replaced."""
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED
                if _SECRET_KEY.search(str(k)) and v not in (None, "")
                else redact_secrets(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_secrets(v) for v in value]
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line overrides with the values of secret-looking keys replaced."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if sep and _SECRET_KEY.search(key) else arg)
    return out


def _jsonable(value: Any) -> Any:
    """Plain floats (NaN/inf as strings, since JSON has none) from tensors and numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def wandb_mode(requested: str) -> str:
    """``auto`` means online when an API key is configured, offline otherwise."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """Logs metrics to ``metrics.jsonl``, W&B (optional) and the console.

    Only the main process writes; other ranks get a tracker with ``enabled=False`` (no files,
    no W&B run). A run directory that already holds a W&B run id (``wandb_run_id``) continues
    that run (``resume="allow"``), so a resumed job appends to the same W&B run.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        config: Mapping[str, Any] | None = None,
        wandb_cfg: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._wandb_run: Any = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            wcfg = dict(wandb_cfg or {})
            mode = wandb_mode(str(wcfg.get("mode", "disabled")))
            wcfg["dir"] = str(self.run_dir)
            if mode != "disabled":
                self._start_wandb(mode, wcfg, redact_secrets(dict(config or {})))

    def _start_wandb(self, mode: str, wcfg: dict[str, Any], config: dict[str, Any]) -> None:
        import wandb  # imported lazily: it is slow to import and optional at run time

        # W&B records the command line in the run's metadata: hide secrets given there too.
        argv, sys.argv = sys.argv, redact_argv(sys.argv)
        try:
            self._wandb_run = self._init_wandb(wandb, mode, wcfg, config)
        finally:
            sys.argv = argv
        # A resumed run (same run directory) continues the same W&B run.
        atomic_write_text(self.run_dir / RUN_ID_FILE, self._wandb_run.id + "\n")
        for stage in STAGES:
            self._wandb_run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")

    def _init_wandb(
        self, wandb: Any, mode: str, wcfg: dict[str, Any], config: dict[str, Any]
    ) -> Any:
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        return wandb.init(
            id=run_id,
            resume="allow" if run_id else None,
            mode=mode,
            dir=str(wcfg["dir"]),
            project=wcfg.get("project") or "alignkit",
            entity=wcfg.get("entity") or None,
            group=wcfg.get("group") or None,
            name=wcfg.get("name") or None,
            tags=list(wcfg.get("tags") or []),
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )

    @property
    def wandb_run(self) -> Any:
        return self._wandb_run

    def log(self, metrics: Mapping[str, Any], *, step: int, stage: str) -> None:
        """Append one step's metrics (names without the stage prefix) to every sink."""
        if not self.enabled:
            return
        record = {"stage": stage, "step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            payload = {f"{stage}/{k}": _jsonable(v) for k, v in metrics.items()}
            payload[f"{stage}/step"] = step
            self._wandb_run.log(payload)

    def rewind(self, stage: str, step: int) -> int:
        """Drop ``metrics.jsonl`` records of ``stage`` at ``step`` or later; return how many.

        A resumed run continues from its last checkpoint, so the steps a crash interrupted
        after it are run again: without this they would appear twice. (W&B keeps what it
        received; its step axis ``<stage>/step`` shows the repeated steps where they belong.)
        """
        if not self.enabled or not self.metrics_path.is_file():
            return 0
        records = read_metrics(self.metrics_path)
        kept = [r for r in records if not (r.get("stage") == stage and r.get("step", 0) >= step)]
        if len(kept) < len(records):
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A small table (e.g. sample generations): to ``<name>.json`` and W&B."""
        if not self.enabled:
            return
        atomic_write_text(
            self.run_dir / f"{name}.json", json.dumps({"columns": columns, "rows": rows}, indent=1)
        )
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({name: wandb.Table(columns=columns, data=rows)})

    def write_summary(self, summary: Mapping[str, Any], path: Path | None = None) -> Path:
        """Write ``summary.json`` atomically and set the numbers on the W&B run."""
        path = path or self.run_dir / "summary.json"
        clean = {k: _jsonable(v) for k, v in summary.items()}
        if self.enabled:
            atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")
            if self._wandb_run is not None:
                self._wandb_run.summary.update(clean)
        return path

    def finish(self, exit_code: int = 0) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None


def print_summary(title: str, summary: Mapping[str, Any]) -> None:
    """A two-column table of the headline numbers on the console."""
    table = Table(title=title, show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console.print(table)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# reading offline W&B runs back (no server needed)
# ---------------------------------------------------------------------------------------------

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
