"""Run tracking: JSONL metrics, ``summary.json``, console progress and Weights & Biases.

Every run writes ``metrics.jsonl`` (one JSON object per logged step) and ends by writing
``summary.json`` atomically into its run directory; these local files are the source of
truth, so comparisons work offline. W&B logs the same numbers. Without an API key it runs in
offline mode (``wandb sync <run_dir>/wandb/offline-run-*`` uploads later); the resolved
config is logged with secrets redacted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from alignkit.errors import DataError
from alignkit.io import atomic_write_text

log = logging.getLogger("alignkit")


def make_console(file: IO[str] | None = None) -> Console:
    """The console for messages, on stderr (or ``file``).

    When it is not a terminal (SLURM, nohup, a pipe) rich would wrap at 80 columns, which
    splits paths in two; there it keeps every message on one line instead.
    """
    out = Console(stderr=file is None, file=file)
    if not out.is_terminal:
        out.soft_wrap = True
    return out


console = make_console()

RUN_ID_FILE = "wandb_run_id"
WANDB_STEP_FILE = "wandb_step"
"""The next W&B ``_step`` of the run: an offline run resumed in a new folder continues it."""
STAGES = ("sft", "feedback", "reward_model", "rl", "eval")
"""Stages whose metrics W&B plots against their own ``<stage>/step`` axis."""

SECRET_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "token",
        "access_token",
        "auth_token",
        "refresh_token",
        "bearer",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "secret_key",
        "private_key",
        "authorization",
        "credentials",
    }
)
"""Key names whose values are secrets. A key is secret when its last part (after ``.``) is one
of these, or ends with ``_<one of these>`` (``hf_token``, ``openai_api_key``); matching whole
names, not substrings, keeps ``max_new_tokens`` or ``api_key_env`` (a variable's name) visible."""
REDACTED = "***"


def is_secret_key(key: object) -> bool:
    """Whether a config key (or dotted override path) names a secret."""
    name = str(key).lstrip("+~").rsplit(".", 1)[-1].lower().replace("-", "_")
    return any(name == s or name.endswith(f"_{s}") for s in SECRET_KEYS)


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config where values of secret keys are replaced."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact_secrets(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_secrets(v) for v in value]
    return value


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line overrides with the values of secret keys replaced."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if sep and is_secret_key(key) else arg)
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
        self._wandb_step = 0
        self._pending: tuple[str, int] | None = None
        """(stage, step) of a W&B table row waiting for that step's metrics (one row)."""
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A torn last line (disk full, kill mid-append) would glue onto the next append.
            repair_torn_tail(self.metrics_path)
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
        # A resumed run (same run directory) continues the same W&B run, at the step where it
        # stopped: an offline run resumed in a new offline folder would restart ``_step`` at 0.
        atomic_write_text(self.run_dir / RUN_ID_FILE, self._wandb_run.id + "\n")
        self._wandb_step = max(_read_int(self.run_dir / WANDB_STEP_FILE), int(self._wandb_run.step))
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
            self._log_wandb(payload, joins=(stage, step))

    def _log_wandb(
        self, payload: Mapping[str, Any], *, joins: tuple[str, int] | None, commit: bool = True
    ) -> None:
        """Log to the W&B history row at an explicit ``_step``, remembered in the run directory.

        ``commit=False`` leaves the row open for more of the same ``joins`` (stage, step): a
        step's sample table and its metrics share one row. Anything else closes it first.
        """
        if self._pending is not None and self._pending != joins:
            self._commit_pending()
        self._wandb_run.log(dict(payload), step=self._wandb_step, commit=commit)
        self._pending = None if commit else joins
        if commit:
            self._next_wandb_step()

    def _commit_pending(self) -> None:
        self._wandb_run.log({}, step=self._wandb_step, commit=True)
        self._pending = None
        self._next_wandb_step()

    def _next_wandb_step(self) -> None:
        self._wandb_step += 1
        # Renamed into place but not fsynced: this runs every logged step, and a step file
        # lost to a power cut only costs the W&B step axis of a resumed offline run.
        path = self.run_dir / WANDB_STEP_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"{self._wandb_step}\n")
        os.replace(tmp, path)

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

    def log_table(
        self,
        name: str,
        columns: list[str],
        rows: list[list[Any]],
        *,
        key: str | None = None,
        step: int | None = None,
    ) -> None:
        """A small table (e.g. sample generations): to ``<name>.json`` and W&B.

        W&B pages through the versions of one key, so every step's table goes under the same
        key (``key``, default :func:`table_key` of ``name``: ``rl_samples_step_000020`` ->
        ``rl/samples`` at ``rl/step`` 20) rather than a new key per step.
        """
        if not self.enabled:
            return
        atomic_write_text(
            self.run_dir / f"{name}.json", json.dumps({"columns": columns, "rows": rows}, indent=1)
        )
        if self._wandb_run is not None:
            import wandb

            default_key, default_step = table_key(name)
            key = key or default_key
            step = default_step if step is None else step
            payload: dict[str, Any] = {key: wandb.Table(columns=columns, data=rows)}
            stage = key.split("/", 1)[0]
            if step is not None and stage in STAGES:
                payload[f"{stage}/step"] = step
                # Joins the row of the same step's metrics, logged next.
                self._log_wandb(payload, joins=(stage, step), commit=False)
            else:
                self._log_wandb(payload, joins=None)

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
        """Close the W&B run and say where it is (and how to upload it, when offline)."""
        if self._wandb_run is not None:
            if self._pending is not None:
                self._commit_pending()
            run, self._wandb_run = self._wandb_run, None
            where = wandb_location(run)
            run.finish(exit_code=exit_code)
            console.print(where)


def print_summary(title: str, summary: Mapping[str, Any]) -> None:
    """A two-column table of the headline numbers on the console.

    The title (it names the run directory) is a line of its own: as a table title it would
    be wrapped to the table's width, splitting the path.
    """
    console.print(title, style="bold")
    table = Table(show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console.print(table)


def table_key(name: str) -> tuple[str, int | None]:
    """The W&B key and step of a table named ``<stage>_<what>[_step_<N>]``.

    ``rl_samples_step_000020`` -> (``rl/samples``, 20); ``eval_samples`` -> (``eval/samples``,
    None); a name without a stage prefix is kept as it is.
    """
    match = re.fullmatch(r"(?P<base>.+)_step_(?P<step>\d+)", name)
    base, step = (match["base"], int(match["step"])) if match else (name, None)
    for stage in sorted(STAGES, key=len, reverse=True):
        if base.startswith(f"{stage}_"):
            return f"{stage}/{base[len(stage) + 1 :]}", step
    return base, step


def wandb_location(run: Any) -> str:
    """Where a W&B run lives: its URL online; offline, its folder and the upload command."""
    url = getattr(run, "url", None)
    if url and not getattr(run, "offline", False):
        return f"W&B run: {url}"
    folder = Path(run.dir).parent  # run.dir is <run_dir>/wandb/offline-run-*/files
    return f"W&B offline run {run.id} in {folder}; upload it with: wandb sync {folder}"


def _read_int(path: Path) -> int:
    """An integer kept in a small text file; 0 when the file is missing or unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _torn_line_message(path: Path, lineno: int) -> str:
    return (
        f"{path}:{lineno}: ignoring a torn last line (cut short by a crash or a full disk "
        "while it was appended)"
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file.

    A torn last line (an append cut short by a kill or a full disk) is skipped with a warning
    naming the file; an unreadable line before the last one is corruption, not a torn append,
    and raises :class:`DataError` naming file and line.
    """
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    records = []
    for i, (lineno, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i < len(lines) - 1:
                raise DataError(f"{path}:{lineno}: not a JSON record ({exc.msg})") from None
            log.warning(_torn_line_message(path, lineno))
    return records


def repair_torn_tail(path: Path) -> bool:
    """Cut a torn last line off an append-only JSONL file (warning); True when one was cut.

    Every complete append ends with a newline, so only text after the last newline can be
    torn; a complete record that merely lacks its newline gets the newline instead.
    """
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    head = data.rfind(b"\n") + 1
    try:
        json.loads(data[head:])
    except ValueError:
        log.warning(_torn_line_message(path, data.count(b"\n") + 1))
        with path.open("r+b") as f:
            f.truncate(head)
        return True
    with path.open("ab") as f:
        f.write(b"\n")
    return False
