"""Timing helpers shared by the bench scripts: interleaved A/B timing, the matmul peak, FLOPs."""

from __future__ import annotations

import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an ``n x n @ n x n`` matmul on this machine with the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def import_release(rev: str) -> ModuleType:
    """``reid_ms`` as of git revision ``rev`` of this checkout, imported beside the current one.

    The revision's ``src/reid_ms`` is unpacked into a temporary folder and renamed ``reid_ms_<rev>``, every
    ``reid_ms`` name in it included (its import paths and its custom-op namespace), so both versions run
    in one process and can be timed in the same rounds.
    """
    name = "reid_ms_" + re.sub(r"\W", "_", rev)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/reid_ms"], capture_output=True,
                             check=True).stdout
    dest = Path(tempfile.mkdtemp(prefix="reid_ms_release_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    package = (dest / "src" / "reid_ms").rename(dest / name)
    for path in package.rglob("*.py"):
        path.write_text(re.sub(r"\breid_ms\b", name, path.read_text()))
    sys.path.insert(0, str(dest))
    return importlib.import_module(name)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def vit_flops(tokens: int, dim: int, depth: int, mlp_ratio: float, patch_in: int, patches: int) -> int:
    """FLOPs of one image through a ViT, by hand: patch conv, qkv, attention, projection, MLP."""
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * int(mlp_ratio * dim)) + 4 * tokens * tokens * dim
    return depth * per_block + 2 * patches * patch_in * dim
