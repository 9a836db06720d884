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
VIT = dict(img_size=(64, 32), patch_size=16, stride_size=16, embed_dim=32, depth=2, num_heads=4)
CLIP = dict(img_size=(64, 32), patch_size=8, stride_size=8, width=64, layers=2, heads=4, output_dim=32)
BOMB = 256 * MIB


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


def zero_view(*shape: int) -> torch.Tensor:
    """One stored float viewed as ``shape`` with stride 0: a few bytes on disk, any size declared."""
    return torch.zeros(1).expand(*shape)


def _small_archive(tmp, name):
    record = ts_record({"visual": ts_record({"class_embedding": ts_tensor("0", 64, (64,), (1,))})})
    return ts_archive(tmp / name, record, {"0": bytes(256)})


def hostile_cases(tmp: Path) -> dict[str, tuple[str, Path, str]]:
    """Write the hostile files under ``tmp``: name -> (probe target, path, what the refusal must say)."""
    vit, clip = "vit:" + json.dumps(VIT), "clip:" + json.dumps(CLIP)
    pos_ts = ts_record({"visual": ts_record({
        "class_embedding": ts_tensor("0", 64, (64,), (1,)),
        "positional_embedding": ts_tensor("0", 64, (33, 1 << 26), (0, 0)),
    })})
    google = {"embedding/kernel": zero_view(16, 16, 3, 1 << 22), "embedding/bias": torch.zeros(32), "cls": torch.zeros(1, 1, 32)}
    deep = ts_nested(2000, ts_record({"w": ts_tensor("0", 4, (4,), (1,))}))
    torch.save({"pos_embed": torch.zeros(1, 9, 32)}, tmp / "small.pth")
    return {
        "pos_embed 2^26 columns, stride 0": (vit, torch_file(tmp / "p26.pth", {"pos_embed": zero_view(1, 9, 1 << 26)}), "pos_embed"),
        "pos_embed 2^34 columns, stride 0": (vit, torch_file(tmp / "p34.pth", {"pos_embed": zero_view(1, 9, 1 << 34)}), "pos_embed"),
        "pos_embed 8192x8192 grid of the model's width, stride 0": (
            vit, torch_file(tmp / "grid.pth", {"pos_embed": zero_view(1, 1 + (1 << 26), 32)}), "pos_embed"),
        "positional_embedding 8192x8192 grid of the model's width, stride 0": (clip, torch_file(tmp / "cgrid.pth", {
            "class_embedding": torch.zeros(64), "positional_embedding": zero_view(1 + (1 << 26), 64)}),
            "positional_embedding"),
        "positional_embedding 2^26 columns (.pth)": (clip, torch_file(tmp / "c26.pth", {
            "class_embedding": torch.zeros(64), "positional_embedding": zero_view(33, 1 << 26)}), "positional_embedding"),
        "positional_embedding 2^26 columns (TorchScript)": (
            clip, ts_archive(tmp / "c26.pt", pos_ts, {"0": bytes(256)}), "positional_embedding"),
        "Google keys in a .pth, stride 0": (vit, torch_file(tmp / "g.pth", google), "embedding/kernel"),
        "TorchScript member inflating to 256 MiB": (
            clip, deflated_zeros_member(_small_archive(tmp, "ts.pt"), tmp / "tsbomb.pt", "data/0", BOMB), "bomb"),
        "torch.save member inflating to 256 MiB": (
            vit, deflated_zeros_member(tmp / "small.pth", tmp / "bomb.pth", "data/0", BOMB), "bomb"),
        "2000 nested TorchScript records": (clip, ts_archive(tmp / "deep.pt", deep, {"0": bytes(16)}), "nest deeper"),
        "tuple key nested 1e5 deep": (vit, deep_key_pickle(tmp / "key.pth", 100_000), "tuple key"),
        "sparse tensor": (vit, torch_file(tmp / "sparse.pth", {"pos_embed": torch.zeros(9, 32).to_sparse()}), "sparse"),
        "meta tensor": (vit, torch_file(tmp / "meta.pth", {"pos_embed": torch.empty(1, 9, 32, device="meta")}), "meta"),
        "float4 tensor": (vit, torch_file(tmp / "f4.pth", {"pos_embed": torch.empty(1, 9, 32, dtype=torch.float4_e2m1fn_x2)}),
                          "float4"),
        "through build(pretrained=)": ("build:vit_b16|" + json.dumps(VIT), tmp / "p34.pth", "pos_embed"),
    }



# -- the probe --------------------------------------------------------------------------------------------------

_PROBE = r"""
import json, resource, sys, time
import torch
import reid_ms

limit, cases = int(sys.argv[1]), json.loads(sys.argv[2])
reid_ms.load_vit_weights, reid_ms.load_clip_weights, reid_ms.build  # lazy imports, not charged to the first case
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
