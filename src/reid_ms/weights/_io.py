"""Reading checkpoint files into plain dictionaries of tensors, without ever running code from them.

The format is told from the file's bytes, never from its name: a zip holding only ``.npy`` members is
NumPy's ``.npz``; a zip with ``constants.pkl`` is a TorchScript archive (read by the restricted reader
in :mod:`reid_ms.weights.torchscript`); any other zip or a bare pickle is ``torch.save`` output, read
with ``weights_only=True``; an 8-byte length followed by ``{`` is safetensors.
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch

from reid_ms.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError

FORMAT_TORCH = "torch.save"
FORMAT_NPZ = "npz"
FORMAT_SAFETENSORS = "safetensors"
FORMAT_TORCHSCRIPT = "torchscript"


def _open_error(path: str, e: OSError) -> CheckpointError:
    return CheckpointError(f"{path!r} cannot be read ({e.strerror or e}); check that the file is readable by "
                           f"this user and is a regular file on a working disk")


# A deflated member inflating more than this many times, past 16 MiB, is a decompression bomb: real
# weights barely compress (torch.save and torch.jit.save store members uncompressed).
_MAX_RATIO = 100
_RATIO_FLOOR = 16 << 20


def check_members(zf: zipfile.ZipFile, path: str, budget: Optional[int]) -> None:
    """Refuse an archive from its central directory alone, before any member is inflated."""
    size = os.path.getsize(path)
    inflated = 0
    for info in zf.infolist():
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size or info.header_offset + info.compress_size > size:
                raise CheckpointError(f"{path!r}: the archive member {info.filename!r} declares {info.file_size} "
                                      f"bytes that the file does not hold; the file is damaged or hostile")
            continue
        inflated += info.file_size
        if info.file_size > _RATIO_FLOOR and info.file_size > _MAX_RATIO * max(info.compress_size, 1):
            raise CheckpointError(f"{path!r}: the archive member {info.filename!r} inflates {info.compress_size} "
                                  f"bytes to {info.file_size}; refused as a decompression bomb")
    if budget is not None and inflated > budget:
        raise CheckpointError(f"{path!r}: its compressed members inflate to {inflated / 2**20:.0f} MiB, more than "
                              f"a checkpoint for this model can need ({budget / 2**20:.0f} MiB); the file is "
                              f"not for this model, or is a decompression bomb")


def sniff_format(path: str, budget: Optional[int] = None) -> str:
    """The container format of ``path``: one of ``FORMAT_*``; a :class:`CheckpointError` otherwise.

    ``budget`` bounds, in bytes, what the archive's compressed members may inflate to (see
    :func:`reid_ms.weights._common.memory_budget`); it is checked before anything is inflated.
    """
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path!r} does not exist or is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise _open_error(path, e) from e
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
                check_members(zf, path, budget)
                # torch.load does not check the members' CRC-32, so a flipped byte in a tensor would load
                # as a silently different weight: check every member once here.
                bad = zf.testzip()
        except CheckpointError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError,
                zlib.error) as e:
            raise CheckpointError(f"{path!r} looks like a zip archive but cannot be opened ({e}); "
                                  f"the file is damaged or incomplete: download it again") from e
        if bad is not None:
            raise CheckpointError(f"{path!r}: the archive member {bad!r} fails its CRC-32 check; the file is "
                                  f"damaged: download it again")
        if names and all(n.endswith(".npy") for n in names):
            return FORMAT_NPZ
        if any(n.endswith("constants.pkl") for n in names):
            return FORMAT_TORCHSCRIPT
        return FORMAT_TORCH
    if head[:1] == b"\x80":
        return FORMAT_TORCH
    if len(head) == 9 and head[8:9] == b"{":
        return FORMAT_SAFETENSORS
    raise CheckpointError(f"{path!r} is not a checkpoint reid_ms can read (not a torch.save file, a "
                          f"TorchScript archive, an .npz or a .safetensors file; it starts with {head[:8]!r})")


def _read_torch(path: str) -> Any:
    try:
        # not mmap=True: torch then skips its check of each storage's record size, and a short member reads
        # the bytes that follow it in the file as weights
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise UnsafeCheckpointError(
                f"{path!r} asks to create objects other than tensors and plain containers; reid_ms loads "
                f"with weights_only=True and never runs code from a file. If you trust the file, re-save "
                f"its state dict with torch.save(model.state_dict(), path). Details: {msg.splitlines()[0]}"
            ) from e
        raise CheckpointError(f"{path!r} cannot be unpickled ({msg.splitlines()[0] if msg else e!r}); "
                              f"the file is damaged or incomplete") from e
    except Exception as e:  # torch reports damaged archives with many exception types
        raise CheckpointError(f"{path!r} cannot be read by torch.load ({type(e).__name__}: {e}); the file "
                              f"is damaged or incomplete: download it again") from e


def _read_npz(path: str) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UnsafeCheckpointError(f"{path!r} holds pickled object arrays; reid_ms reads .npz files with "
                                        f"allow_pickle=False and never runs code from a file") from e
        raise CheckpointError(f"{path!r} is a damaged .npz file ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{path!r} is a damaged .npz file ({type(e).__name__}: {e})") from e


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path!r} is a damaged .safetensors file ({e})") from e
    except struct.error as e:
        raise CheckpointError(f"{path!r} is a damaged .safetensors file ({e})") from e


def read_checkpoint(path: str | os.PathLike, budget: Optional[int] = None) -> tuple[Any, str]:
    """Read ``path`` into Python objects (tensors and plain containers only) and name its format.

    ``budget``: bytes the reader may allocate for what the file declares (``None``: no bound); sizes are
    compared with it before they are read.
    """
    path = os.fspath(path)
    fmt = sniff_format(path, budget)
    try:
        if fmt == FORMAT_NPZ:
            return _read_npz(path), fmt
        if fmt == FORMAT_SAFETENSORS:
            return _read_safetensors(path), fmt
        if fmt == FORMAT_TORCHSCRIPT:
            from reid_ms.weights.torchscript import read_torchscript_archive

            return read_torchscript_archive(path, budget), fmt
        return _read_torch(path), fmt
    except OSError as e:
        raise _open_error(path, e) from e


_WRAPPERS = ("state_dict", "model", "module", "model_state_dict", "net")


def key_name(key: Any) -> str:
    """A file's key for messages: itself when a string, else its type (a deeply nested key has no printable repr)."""
    return key if isinstance(key, str) else f"<{type(key).__name__} key>"


def strip_prefix(state: dict[str, Any], prefix: str = "module.") -> tuple[dict[str, Any], bool]:
    """``state`` without ``prefix`` when every key has it (``module.``: saved from DataParallel / DDP)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}, True
    return state, False


# What the loaders compute with: dense CPU tensors of the dtypes models hold
_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128}


def _check_tensor(t: torch.Tensor, key: str, path: str) -> None:
    if t.layout != torch.strided or t.device.type != "cpu" or t.dtype not in _DTYPES:
        raise CheckpointError(f"{path!r}: tensor {key!r} is a {t.layout} {t.dtype} tensor on {t.device.type}; "
                              f"reid_ms reads dense CPU tensors of the usual dtypes. Re-save it with "
                              f"torch.save({{k: v.to_dense().float() for k, v in state_dict.items()}}, path)")


def flatten_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Find the tensor mapping inside a checkpoint and return it with what was set aside (key -> reason).

    Training scripts wrap state dicts (``{"model": sd, "epoch": 3}``, ``{"state_dict": sd}``); the wrapper
    whose value is a mapping of tensors is taken and its siblings are reported as ignored. Non-tensor
    entries of the state dict itself (OpenAI's integer ``input_resolution``) are reported too.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path!r} holds a {type(obj).__name__}, not a state dict (a mapping of "
                              f"parameter names to tensors)")
    ignored: dict[str, str] = {}
    for _ in range(4):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        ignored.update({key_name(k): "wrapper entry" for k in obj if k != inner})
        obj = obj[inner]
    tensors: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path!r}: the state dict has a {key_name(k)}, not a parameter name; the file "
                                  f"is damaged or not a state dict")
        if isinstance(v, torch.Tensor):
            _check_tensor(v, k, path)
            tensors[k] = v
        else:
            ignored[k] = "not a tensor"
    if not tensors:
        raise CheckpointError(f"{path!r} holds no tensors (top-level keys: {sorted(map(key_name, obj))[:10]})")
    return tensors, ignored
