"""Reading the tensors of a TorchScript archive (OpenAI's ``ViT-B-16.pt``) without running TorchScript.

``torch.jit.save`` writes a zip: ``<root>/data.pkl`` pickles the module tree (each module a ``__torch__.*``
object whose state dict holds its parameters, buffers, submodules and plain attributes),
``<root>/data/<key>`` holds the raw bytes of each storage, ``<root>/code/`` the TorchScript source and
``<root>/constants.pkl`` the tensors baked into the code. ``torch.jit.load`` compiles and runs that
code; this reader only unpickles ``data.pkl`` with an allow-list: the tensor rebuild functions, the
storage types, ``OrderedDict`` and the ``__torch__`` module classes, which become inert records of
their state. Anything else in the pickle is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from reid_ms.errors import CheckpointError, ReidMsError, UnsafeCheckpointError
from reid_ms.weights._io import check_members

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _StorageType:
    """What ``torch.FloatStorage`` and friends unpickle to: only the dtype the storage bytes hold."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class ScriptModuleRecord:
    """A TorchScript module from ``data.pkl`` as plain data: its class name and its attribute dict.

    Unpickling creates it empty and ``BUILD`` hands it the state; it has no behaviour to trigger.
    """

    type_name = "__torch__"

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _record_class(module: str, name: str) -> type:
    return type(name, (ScriptModuleRecord,), {"type_name": f"{module}.{name}", "__module__": __name__})


def _check_strided(storage: torch.Tensor, offset: Any, size: Any, stride: Any) -> None:
    ok = (isinstance(offset, int) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
          and len(size) == len(stride) and all(isinstance(v, int) and v >= 0 for v in size + stride))
    if not ok:
        raise CheckpointError(f"tensor record with offset {offset!r}, size {size!r}, stride {stride!r} is malformed")
    extent = 0 if 0 in size else offset + 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if extent > storage.numel():
        raise CheckpointError(f"tensor of size {list(size)} at offset {offset} reaches element {extent} of a "
                              f"storage of {storage.numel()} elements")


def _rebuild_tensor(storage: torch.Tensor, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    # Covers _rebuild_tensor and _rebuild_tensor_v2: requires_grad, backward hooks and metadata are dropped.
    if not isinstance(storage, torch.Tensor):
        raise CheckpointError(f"tensor record refers to a {type(storage).__name__}, not a storage")
    _check_strided(storage, storage_offset, size, stride)
    return torch.as_strided(storage, size, stride, storage_offset)


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter record wraps a {type(data).__name__}, not a tensor")
    return data


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``, taking storages from the archive and refusing every class not allowed."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, big_endian: bool, path: str,
                 budget: Optional[int]) -> None:
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._root = root
        self._big_endian = big_endian
        self._path = path
        self._budget = budget
        self._copied = 0  # bytes of storages copied into memory (compressed, swapped or unaligned ones)
        self._storages: dict[str, torch.Tensor] = {}
        self._records: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            return _ALLOWED_FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            return self._records.setdefault((module, name), _record_class(module, name))
        raise UnsafeCheckpointError(
            f"{self._path!r} asks to create {module}.{name}, which is not part of a TorchScript module's "
            f"weights; reid_ms never runs code from a file. If you trust the file, load it with "
            f"torch.jit.load and save its state_dict() with torch.save"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise UnsafeCheckpointError(f"{self._path!r} refers to an external object {pid!r}; only storages "
                                        f"of the archive are allowed")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointError(f"{self._path!r}: storage {key!r} is read as {storage.dtype} and "
                                  f"{storage_type.dtype}; the archive is inconsistent")
        return storage

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        member = f"{self._root}data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError as e:
            raise CheckpointError(f"{self._path!r}: the archive lacks the storage member {member!r}; the file "
                                  f"is damaged or incomplete: download it again") from e
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        # declared sizes are compared before a byte is read: a record may claim any numel
        if numel < 0 or info.file_size < nbytes:
            raise CheckpointError(f"{self._path!r}: storage {member!r} holds {info.file_size} bytes, {numel} "
                                  f"{dtype} elements need {nbytes}; the file is damaged or truncated")
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        flat = self._map(info, nbytes, itemsize)
        if flat is None:
            self._charge(nbytes, member)
            flat = torch.empty(nbytes, dtype=torch.uint8)
            with self._archive.open(info) as f:
                # a ZipExtFile, a BufferedIOBase; typeshed types ZipFile.open as IO[bytes], without readinto
                if f.readinto(flat.numpy()) != nbytes:  # type: ignore[attr-defined]
                    raise CheckpointError(f"{self._path!r}: storage {member!r} ends early; the file is truncated")
        if self._big_endian and itemsize > 1:
            self._charge(nbytes, member)
            flat = flat.view(numel, itemsize).flip(-1).reshape(-1)
        return flat.view(dtype)

    def _map(self, info: zipfile.ZipInfo, nbytes: int, itemsize: int) -> Optional[torch.Tensor]:
        """An uncompressed member mapped from the file (copy-on-write), or ``None`` when it must be read."""
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(self._path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self._path!r}: the local header of {info.filename!r} is damaged")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        if offset % itemsize:
            return None  # torch's kernels expect aligned elements; torch.jit.save aligns to 64 bytes
        return torch.from_numpy(np.memmap(self._path, dtype=np.uint8, mode="c", offset=offset, shape=(nbytes,)))

    def _charge(self, nbytes: int, member: str) -> None:
        self._copied += nbytes
        if self._budget is not None and self._copied > self._budget:
            raise CheckpointError(f"{self._path!r}: reading {member!r} brings the storages copied into memory to "
                                  f"{self._copied / 2**20:.0f} MiB, more than a checkpoint for this model can "
                                  f"need ({self._budget / 2**20:.0f} MiB); the file is not for this model")


Entry = Union[torch.Tensor, int]


# Real module trees are a few levels deep (CLIP: model.visual.transformer.resblocks.N.attn)
_MAX_DEPTH = 64


def _collect(root: ScriptModuleRecord, path: str) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    seen: set[int] = set()
    todo = [(root, "", 0)]
    while todo:
        record, prefix, depth = todo.pop()
        if id(record) in seen:
            continue
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{path!r}: its module records nest deeper than {_MAX_DEPTH} levels; no model "
                                  f"is built that way: the file is damaged or hostile")
        seen.add(id(record))
        state = getattr(record, "state", None)
        if not isinstance(state, dict):
            continue
        for name, value in state.items():
            key = f"{prefix}{name}"
            if isinstance(value, torch.Tensor):
                out[key] = value
            elif isinstance(value, ScriptModuleRecord):
                todo.append((value, f"{key}.", depth + 1))
            elif isinstance(value, int) and not isinstance(value, bool):
                out[key] = value
    return out


def read_torchscript_archive(path: str | os.PathLike, budget: Optional[int] = None) -> dict[str, Entry]:
    """The parameters, buffers and integer attributes of a TorchScript archive, by dotted name.

    Keys are what ``torch.jit.load(path).state_dict()`` gives (``visual.conv1.weight``, ...), plus integer
    module attributes (``input_resolution`` when it was saved as an int). Tensors keep their stored dtype.
    Raises :class:`UnsafeCheckpointError` when ``data.pkl`` names anything but tensors, storages and
    TorchScript modules, and :class:`CheckpointError` for a damaged archive. Uncompressed storages are
    mapped from the file; ``budget`` bounds the bytes copied into memory (compressed or byte-swapped
    storages), checked from the declared sizes before each copy.
    """
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            check_members(archive, path, budget)
            names = archive.namelist()
            roots = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(roots) != 1:
                raise CheckpointError(f"{path!r} is not a TorchScript archive: expected one <root>/data.pkl "
                                      f"member, found {len(roots)}")
            root = roots[0]
            byteorder = "little"
            if f"{root}byteorder" in names:
                with archive.open(f"{root}byteorder") as f:
                    byteorder = f.read(16).decode().strip()
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{path!r}: unknown byte order {byteorder!r} in {root}byteorder")
            unpickler = _ArchiveUnpickler(archive.read(f"{root}data.pkl"), archive, root,
                                          big_endian=byteorder == "big", path=path, budget=budget)
            module = unpickler.load()
    except ReidMsError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, RuntimeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path!r} is a damaged TorchScript archive ({type(e).__name__}: {e}); download "
                              f"it again") from e
    if not isinstance(module, ScriptModuleRecord):
        raise CheckpointError(f"{path!r}: data.pkl holds a {type(module).__name__}, not a TorchScript module")
    out = _collect(module, path)
    if not any(isinstance(v, torch.Tensor) for v in out.values()):
        raise CheckpointError(f"{path!r}: the TorchScript module {module.type_name} holds no tensors")
    return out
