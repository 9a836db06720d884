"""Hostile checkpoint files, small on disk, declaring large or deep things; and a probe that loads them in a
fresh process under an address-space limit and reports the memory and time each load took."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

MIB = 1 << 20


# -- TorchScript archives written opcode by opcode (torch.jit.save cannot write what an attacker writes) -------


def _op(value: object) -> bytes:
    """The pickle opcodes of a plain value (str, int, tuple of ints), without PROTO and STOP."""
    return pickle.dumps(value, protocol=2)[2:-1]


def ts_tensor(key: str, numel: int, size: tuple[int, ...], stride: tuple[int, ...], storage: str = "FloatStorage",
              offset: int = 0) -> bytes:
    """A ``_rebuild_tensor_v2`` record viewing archive storage ``data/<key>`` of ``numel`` elements."""
    persistent_id = (b"(" + _op("storage") + f"ctorch\n{storage}\n".encode() + _op(key) + _op("cpu") + _op(numel)
                     + b"tQ")
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + persistent_id + _op(offset) + _op(tuple(size))
            + _op(tuple(stride)) + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")


def ts_record(items: dict[str, bytes], cls: str = "Module") -> bytes:
    """A ``__torch__.<cls>`` module record whose state maps names to the given opcodes."""
    return f"c__torch__\n{cls}\n".encode() + b")\x81}(" + b"".join(_op(k) + v for k, v in items.items()) + b"ub"


def ts_nested(depth: int, inner: bytes) -> bytes:
    """``depth`` module records, each the ``child`` of the one above, around ``inner`` (written without recursion)."""
    opening = b"c__torch__\nModule\n)\x81}(" + _op("child")
    return opening * depth + inner + b"ub" * depth


def ts_archive(path: Path, record: bytes, storages: dict[str, bytes], byteorder: str = "little") -> Path:
    """Write a TorchScript zip: ``archive/data.pkl`` holding ``record``, its storages, constants and byte order."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + record + b".")
        zf.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
    return path


def deflated_zeros_member(src: Path, dst: Path, member_suffix: str, inflated: int) -> Path:
    """Copy the zip ``src`` to ``dst`` with the member ending in ``member_suffix`` replaced by ``inflated``
    zero bytes, deflated (about a thousandth of that on disk); streamed, so this process stays small."""
    chunk = bytes(MIB)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith(member_suffix):
                target = zipfile.ZipInfo(info.filename)
                target.compress_type = zipfile.ZIP_DEFLATED
                with zout.open(target, "w", force_zip64=True) as f:
                    for _ in range(inflated // MIB):
                        f.write(chunk)
            else:
                zout.writestr(info, zin.read(info.filename))
    return dst


def torch_file(path: Path, state: dict) -> Path:
    torch.save(state, path)
    return path


def deep_key_pickle(path: Path, depth: int) -> Path:
    """A torch.save zip whose state dict has, beside a tensor, a key that is a tuple nested ``depth`` deep."""
    buf = io.BytesIO()
    torch.save({"pos_embed": torch.zeros(1, 3, 4)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                at = raw.index(b"}") + 3  # after EMPTY_DICT and its BINPUT: the dict is on the stack
                raw = raw[:at] + _op("x") + b"\x85" * depth + _op(1) + b"s" + raw[at:]
            zout.writestr(info, raw)
    return path


# -- the probe --------------------------------------------------------------------------------------------------

_PROBE = r"""
import json, resource, sys, time
import torch
import reid_ms

limit, cases = int(sys.argv[1]), json.loads(sys.argv[2])
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + limit, vm + limit))
out = []
for target, path in cases:
    kind, _, spec = target.partition(":")
    args = json.loads(spec) if spec.startswith("{") else {}
    if kind == "build":
        name, args = spec.split("|", 1)
        args = json.loads(args)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        if kind == "vit":
            reid_ms.load_vit_weights(reid_ms.VitTrans(**args), path)
        elif kind == "clip":
            reid_ms.load_clip_weights(reid_ms.ClipVisual(**args), path)
        else:
            reid_ms.build(name, pretrained=path, **args)
        outcome, message = "loaded", ""
    except reid_ms.ReidMsError as e:
        outcome, message = type(e).__name__, str(e)
    except BaseException as e:
        outcome, message = "raw " + type(e).__name__, str(e)[:300]
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    out.append(dict(outcome=outcome, message=message, seconds=seconds, grown=grown))
print(json.dumps(out))
"""


def probe(cases: list[tuple[str, str]], limit: int = 2 << 30) -> list[dict]:
    """Load each ``(target, path)`` in one fresh process whose address space may grow by ``limit`` bytes.

    ``target`` is ``vit:{json args}``, ``clip:{json args}`` or ``build:name|{json args}``. Returns per case
    the outcome (a reid_ms error's class name, ``loaded``, or ``raw <Exception>``), the message, the
    seconds taken and how far the peak resident memory grew during it (bytes; the peak of the process, so
    a case is only charged for growth past every earlier case's).
    """
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(limit), json.dumps(cases)], capture_output=True,
                          text=True, env=env, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"the probe process failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
