"""One run directory, one alignkit process: a lock, stale-temporary cleanup, launch records.

:func:`run_guard` wraps a stage. It

1. takes an exclusive ``flock`` on ``<run_dir>/.alignkit.lock`` (the holder's pid is written
   into it). The OS drops the lock when the process ends, however it ends, so a crashed run
   never leaves the directory locked; a second run fails at once with
   :class:`RunDirInUseError` naming the holder's pid;
2. removes temporaries that atomic writers of dead processes left behind
   (``.latest.*.tmp``, ``.policy.*.tmp``, ``.step_*.tmp``, ``.*.old``);
3. keeps this launch's composed config as ``<run_dir>/launches/<time>-<pid>.yaml``, so a
   resumed run (whose Hydra overwrites ``.hydra/config.yaml``) loses no earlier config.

Re-entrant within a process (the pipeline holds it while its RL stage enters it again).
Under several ranks only the main process locks, cleans and records; the others learn the
outcome from it, so all ranks fail alike.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.io import atomic_write_text, remove_path, stale_temporaries, write_error

LOCK_FILE = ".alignkit.lock"
LAUNCHES_DIR = "launches"

_held: dict[Path, int] = {}
"""Run directories guarded by this process -> the lock's file descriptor (-1 off the main
process, which holds no lock itself)."""


class RunDirInUseError(AlignkitError):
    """Another live alignkit process holds the run directory's lock."""


def _holder_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def acquire(run_dir: Path) -> int:
    """Lock ``run_dir`` for this process; return the lock's file descriptor."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    # 0o666 & ~umask: a colleague may read who holds it.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder_pid(fd)
        os.close(fd)
        raise RunDirInUseError(
            f"run directory {run_dir} is in use by another alignkit process (pid {pid}); "
            "wait for it to finish or choose another run_dir"
        ) from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    """Drop the lock (closing the descriptor releases the ``flock``)."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove dead writers' temporaries in ``run_dir``, its stage folders and checkpoints."""
    folders = [run_dir]
    with contextlib.suppress(OSError):
        for sub in run_dir.iterdir():
            if sub.is_dir() and not sub.name.startswith(".") and sub.name != "wandb":
                folders += [sub, sub / "checkpoints"]
    removed = []
    for folder in folders:
        for stale in stale_temporaries(folder):
            remove_path(stale)
            removed.append(stale)
    return removed


def record_launch(run_dir: Path, cfg: Any) -> Path:
    """Write this launch's composed config to ``launches/<time>-<pid>.yaml`` (secrets hidden)."""
    from omegaconf import OmegaConf

    from alignkit.tracking import redact_secrets

    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an interpolation that needs Hydra's runtime: keep it unresolved
        tree = OmegaConf.to_container(cfg)
    text = OmegaConf.to_yaml(OmegaConf.create(redact_secrets(tree)))
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S.%f")
    return atomic_write_text(run_dir / LAUNCHES_DIR / f"{stamp}-{os.getpid()}.yaml", text)


def _start(run_dir: Path, cfg: Any) -> tuple[int | None, AlignkitError | None]:
    """Lock, clean, record on the main process: (lock fd, None) or (None, the error)."""
    try:
        fd = acquire(run_dir)
    except RunDirInUseError as exc:
        return None, exc
    except OSError as exc:  # a read-only or missing parent: name the file and the cause
        return None, write_error(run_dir / LOCK_FILE, exc, "the run lock")
    try:
        removed = clean_stale_temporaries(run_dir)
        if removed:
            from alignkit.tracking import console

            names = ", ".join(str(p.relative_to(run_dir)) for p in removed[:5])
            console.print(f"removed {len(removed)} stale temporary file(s): {names}")
        record_launch(run_dir, cfg)
    except AlignkitError as exc:
        release(fd)
        return None, exc
    return fd, None


@contextlib.contextmanager
def run_guard(ctx: Any) -> Iterator[None]:
    """Hold ``ctx.run_dir``'s lock for the block (see the module docstring)."""
    run_dir = Path(ctx.run_dir).resolve()
    if run_dir in _held:
        yield
        return
    backend = ctx.backend
    fd, error = _start(run_dir, ctx.cfg) if ctx.is_main_process else (None, None)
    if getattr(backend, "distributed", False):
        # Every rank raises the main process's error, so none waits at a later collective.
        error = backend.broadcast_object(error)
    if error is not None:
        raise error
    # Every rank records the entry, so a nested guard returns early on all ranks alike
    # (and none waits in a broadcast the main process skips).
    _held[run_dir] = -1 if fd is None else fd
    try:
        yield
    finally:
        _held.pop(run_dir, None)
        if fd is not None:
            release(fd)
