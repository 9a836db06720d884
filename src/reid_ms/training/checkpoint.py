"""Run folders' files, written so that a crash at any moment leaves the previous version whole.

Every file goes to a temporary file in the same folder, is flushed to the disk (``fsync``) and then
renamed over the old one (``os.replace``, atomic on POSIX and Windows); the folder is synced too, so
the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from reid_ms.errors import CheckpointError, CheckpointNotFoundError

__all__ = ["atomic_write", "save_checkpoint", "load_checkpoint", "write_jsonl", "rng_state", "set_rng_state"]


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, sync it and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)              # mkstemp makes 0600 files; give open()'s default
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):              # make the rename durable (not possible on Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read with ``weights_only=True`` onto the CPU."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"{str(path)!r} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
        raise CheckpointError(f"cannot read the training checkpoint {str(path)!r} ({type(exc).__name__}: {exc}); "
                              f"it is damaged or was not written by reid-ms train: delete it to start over") from exc
    missing = [k for k in ("model", "epoch", "optimizer", "scheduler", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} is not a reid-ms training checkpoint (lacks {missing}); "
                              f"resume only from the last.pt of a reid-ms train run")
    return state


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """``rows`` as JSON lines, replacing ``path`` atomically."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(path, lambda f: f.write(text.encode()))


def rng_state() -> dict[str, Any]:
    """The states of torch's, NumPy's and Python's global generators, as ``weights_only``-loadable values."""
    numpy_state = np.random.get_state(legacy=False)
    mt = numpy_state["state"]  # MT19937's {"key": [624] uint32, "pos": int}
    version, words, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(mt["key"].astype(np.int64)), "pos": int(mt["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]), "cached_gaussian": float(numpy_state["gauss"])},
        "python": {"version": version, "words": list(words), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
