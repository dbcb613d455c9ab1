"""Reading ``torch.distributed.checkpoint`` (DCP) folders without running code stored in them.

A DCP folder's ``.metadata`` is a pickle, and ``torch.distributed.checkpoint.load`` unpickles
it with :func:`pickle.load`: a crafted checkpoint (downloaded, shared) could run any code
the moment it is exported. Its values written as bytes (``BytesStorageMetadata``) are read
with ``torch.load(weights_only=False)``, a second way in. Here:

* :func:`read_dcp_metadata` unpickles ``.metadata`` with an unpickler that resolves only the
  classes DCP metadata is made of (:data:`ALLOWED_GLOBALS`, the dataclasses of
  ``torch.distributed.checkpoint.metadata`` and their field types) and refuses anything
  else, naming the file, before any object is built; it also checks the shape of what it
  read (every data file a plain relative path inside the folder).
* :func:`load_dcp_tensors` loads tensors only: every requested key must be stored as a
  tensor, the metadata comes from :func:`read_dcp_metadata` (``.metadata`` is never
  unpickled again), and a bytes item is refused. Tensor data itself is read by DCP with
  ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

from alignkit.errors import ConfigError

__all__ = [
    "ALLOWED_GLOBALS",
    "METADATA_NAME",
    "WeightsOnlyPlanner",
    "load_dcp_state",
    "load_dcp_tensors",
    "read_dcp_metadata",
    "safe_reader",
]

METADATA_NAME = ".metadata"

ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    # The metadata dataclasses themselves (torch.distributed.checkpoint.metadata).
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    # Where each item lives: (relative file, offset, length) of the file-system writer.
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # Field types: shapes, layouts (rebuilt by name lookup) and the checkpoint's path.
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}
"""module -> names the metadata unpickler resolves; ``torch.<dtype>`` objects are allowed too.
None of them runs anything but building a value when called with pickled arguments."""


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS` (and torch dtypes); anything else is refused."""

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise ConfigError(
            f"{self.source}: refusing to load DCP metadata that references {module}.{name} "
            "(not a class checkpoint metadata is made of; the file may run code when loaded)"
        )


def _check_relative(source: Path, relative: Any) -> None:
    path = PurePath(str(relative))
    if not isinstance(relative, str) or path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{source}: data file {relative!r} is outside the checkpoint folder")


def _validate(source: Path, metadata: Any) -> Metadata:
    """The unpickled object, checked to be DCP metadata of the file-system layout."""
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ConfigError(f"{source}: not DCP checkpoint metadata ({type(metadata).__name__})")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise ConfigError(f"{source}: DCP metadata without a storage index")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not hasattr(info, "relative_path"):
            raise ConfigError(f"{source}: malformed DCP storage index entry {index!r}")
        _check_relative(source, info.relative_path)
    return metadata


def read_dcp_metadata(dcp_dir: str | Path, name: str = METADATA_NAME) -> Metadata:
    """The metadata of the DCP folder ``dcp_dir``, unpickled without running code.

    Raises:
        ConfigError: naming the file, when it is missing, malformed, or references anything
            outside :data:`ALLOWED_GLOBALS` (checked before any referenced object is built).
    """
    source = Path(dcp_dir) / name
    try:
        with source.open("rb") as f:
            metadata = _MetadataUnpickler(f, source).load()
    except ConfigError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"{source}: missing; not a complete DCP checkpoint") from None
    except Exception as exc:  # any unpickling failure means the file is not what DCP wrote
        raise ConfigError(f"{source}: unreadable DCP metadata ({type(exc).__name__})") from exc
    return _validate(source, metadata)


class _SafeReader(FileSystemReader):
    """A file-system reader whose metadata comes from :func:`read_dcp_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = METADATA_NAME if rank is None else f"__{rank}{METADATA_NAME}"
        metadata = read_dcp_metadata(Path(str(self.path)), name)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    """Refuses bytes items, which DCP would read with ``torch.load(weights_only=False)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise ConfigError(
            f"DCP item {read_item.dest_index.fqn!r} is stored as pickled bytes, not a tensor"
        )


class WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with bytes items (an optimizer's ``param_groups``: numbers,
    strings, tuples) read by ``torch.load(weights_only=True)``, which builds no other object.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ConfigError(
                f"DCP item {read_item.dest_index.fqn!r} holds objects a checkpoint should not "
                f"(refused by torch.load(weights_only=True)): {exc}"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_reader(dcp_dir: str | Path) -> FileSystemReader:
    """A DCP storage reader whose ``.metadata`` goes through :func:`read_dcp_metadata`."""
    return _SafeReader(Path(dcp_dir))


def load_dcp_state(state: dict[str, Any], dcp_dir: str | Path) -> None:
    """``torch.distributed.checkpoint.load`` of ``state`` (tensors and plain data, e.g. an
    optimizer's param groups) that runs no code stored in the checkpoint.

    Collective under a process group, like ``dcp.load``. The metadata is checked first with
    :func:`read_dcp_metadata` (a refusal is the same clear error on every rank); bytes items
    are read with ``torch.load(weights_only=True)`` (:class:`WeightsOnlyPlanner`). A refusal
    inside DCP's own exception is re-raised as the :class:`ConfigError` it was.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    read_dcp_metadata(dcp_dir)
    try:
        dcp.load(state, storage_reader=safe_reader(dcp_dir), planner=WeightsOnlyPlanner())
    except CheckpointException as exc:
        # Each failure is an (exception, traceback) pair.
        raised = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        ours = [e for e in raised if isinstance(e, ConfigError)]
        if ours:
            raise ours[0] from None
        raise


def _tensor_keys(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Flattened DCP keys (``a.b.c``) of the tensors in a nested ``state`` dict."""
    keys = []
    for key, value in state.items():
        if isinstance(value, dict):
            keys += _tensor_keys(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            keys.append(f"{prefix}{key}")
        else:
            raise TypeError(f"only tensors (and dicts of them) can be loaded, got {key!r}")
    return keys


def load_dcp_tensors(state: dict[str, Any], dcp_dir: str | Path) -> None:
    """Fill the tensors of ``state`` (nested dicts, e.g. ``{"model": sd}``) in place from DCP.

    Runs in one process without a process group: DCP reads every shard into the full tensors
    given (resharding on load). Every key must be stored as a tensor of the same shape.

    Raises:
        ConfigError: unsafe or malformed metadata (:func:`read_dcp_metadata`), or a key that
            the checkpoint lacks or stores as bytes, naming the folder.
    """
    import torch.distributed.checkpoint as dcp

    dcp_dir = Path(dcp_dir)
    stored = read_dcp_metadata(dcp_dir).state_dict_metadata
    for key in _tensor_keys(state):
        if key not in stored:
            raise ConfigError(f"{dcp_dir}: no {key!r} in the checkpoint")
        if not isinstance(stored[key], TensorStorageMetadata):
            raise ConfigError(f"{dcp_dir}: {key!r} is not stored as a tensor")
    with warnings.catch_warnings():
        # Without a process group DCP assumes one process and says so; that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=_SafeReader(dcp_dir), planner=_TensorsOnlyPlanner())
