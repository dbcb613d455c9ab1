"""Atomic file and directory writes: a crash never leaves a half-written output behind.

Guarantees of the writers here:

* readers see the old complete file/folder or the new complete one, never a mixture;
* outputs get the permissions of an ordinary ``open``/``mkdir`` under the process's umask
  (``tempfile`` would leave 0600 files and 0700 folders that colleagues cannot read);
* temporaries are named ``.<name>.<pid>.<random>.tmp`` (``.old`` for a replaced folder on
  its way out), so :func:`stale_temporaries` can tell a dead writer's leftovers from a live
  one's;
* a failed write (disk full, read-only folder) raises :class:`WriteError`, one line naming
  the output and the cause, and leaves no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from alignkit.errors import AlignkitError


class WriteError(AlignkitError):
    """An output could not be written (disk full, read-only folder, ...): names file and cause."""


def describe_os_error(exc: BaseException) -> str:
    """A short cause: ``No space left on device (ENOSPC)`` rather than a bare errno."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{exc.strerror or os.strerror(exc.errno)} ({name})"
    return str(exc) or type(exc).__name__


def write_error(path: str | Path, exc: BaseException, what: str = "") -> WriteError:
    """A :class:`WriteError` for ``path`` caused by ``exc`` (chain it with ``from exc``)."""
    return WriteError(f"cannot write {what + ' ' if what else ''}{path}: {describe_os_error(exc)}")


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way to read it is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(path: Path) -> str:
    # The pid in the name lets a later run tell a dead writer's leftovers from a live one's.
    return f".{path.name}.{os.getpid()}."


_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?(?P<rand>[A-Za-z0-9_]{8})\.(?:tmp|old)$")


def temporary_owner(name: str) -> int | None:
    """The pid that created the writer's temporary ``name``; 0 for an old pid-less name.

    None when ``name`` is not one of this module's temporaries.
    """
    match = _TEMP.match(name)
    if match is None:
        return None
    return int(match["pid"]) if match["pid"] else 0


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (``kill(pid, 0)``; EPERM means it does)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporaries of the atomic writers in ``folder`` whose writer is no longer running."""
    out = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for entry in entries:
        pid = temporary_owner(entry.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        out.append(entry)
    return out


def remove_path(path: Path) -> None:
    """Delete a file or a folder tree, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry itself reaches the disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory and a rename.

    Raises :class:`WriteError` naming ``path`` when the disk is full or the folder read-only.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600: give it what open() would have under the umask.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``path`` only once the block completes.

    The scratch directory sits next to ``path`` (same filesystem, so the final step is a
    rename). Readers see either the old complete directory or the new complete one, never a
    mixture; an exception or a crash inside the block leaves at most a hidden
    ``.name.<pid>.*.tmp``. An ``OSError`` (in the block too) becomes a :class:`WriteError`
    naming ``path``.
    """
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and not path.is_dir():
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a directory")
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        # mkdtemp makes the folder 0700: give it what mkdir() would have under the umask.
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            # os.replace cannot overwrite a non-empty directory: the old one moves aside
            # first and is deleted only once the new one is in place.
            trash = Path(
                tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent)
            )
            os.replace(path, trash / "old")
            os.replace(tmp, path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``path`` by calling ``fill(tmp_dir)`` inside :func:`atomic_directory`."""
    with atomic_directory(path) as tmp:
        fill(tmp)
    return Path(path)
