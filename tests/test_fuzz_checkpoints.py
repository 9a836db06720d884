"""Seeded fuzzing of every checkpoint layout the loaders read.

Each intact file is written here from a tiny model, then damaged: truncated, bytes flipped, zip members
dropped / added / renamed / rewritten (with a correct CRC, so the content checks are reached), tensors
turned to int / bool / complex / float64, filled with NaN or inf, shapes off by one, keys renamed,
dropped or added. Every case must end in one of two ways:

- a :class:`~reid_ms.CheckpointError` (or subclass) with the model exactly as it was before the call;
- a load whose model state equals the intact file's, tensor for tensor. Two documented exceptions:
  parts the report lists as kept at initialisation (a checkpoint without a camera table, a trained
  head that does not fit) equal the fresh model's values; and in the two formats that carry no
  checksum (legacy ``torch.save`` pickles and ``.safetensors``) a flipped data byte is a different
  but well-formed number, so the model must then hold exactly what the damaged file stores, read
  back with torch's and safetensors' own readers.

Anything else (another exception type, a hang, a partly loaded model) fails the test. The case count
and the outcome tally are printed to the terminal.
"""

from __future__ import annotations

import collections
import io
import random
import signal
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

import reid_ms
from reid_ms import CheckpointError, ClipVisual, UnsafeCheckpointError, VitTrans
from _helpers_clip import OpenAIStyleCLIP, open_clip_model, write_openai_archive
from _helpers_hostile import MIB, _op, ts_nested, ts_record, ts_tensor
from _helpers_vit import bilinear_grid, google_npz, timm_vit

VIT = dict(img_size=(64, 32), patch_size=16, stride_size=16, embed_dim=32, depth=2, num_heads=4,
           drop_path_rate=0.0)
CLIP = dict(img_size=(64, 32), patch_size=8, stride_size=8, width=64, layers=2, heads=4, output_dim=32)
CAMERAS, CLASSES = 3, 5
SECONDS_PER_LOAD = 10
BOMB = 64 * MIB
# Peak resident memory a case may add: the tiny models are about 0.5 MiB; a loader that inflated a bomb
# or materialised a declared view would add 64 MiB to gigabytes.
MAX_GROWTH = 32 * MIB


def _memory() -> tuple[int, int]:
    """``(current, peak)`` resident bytes of this process (Linux ``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current resident size
        f.write("5")


# -- the intact files ------------------------------------------------------------------------------------------


def _torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _npz_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: v.numpy() for k, v in state.items()})
    return buf.getvalue()


def _bnneck(width: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"weight": torch.rand(width, generator=gen) + 0.5, "bias": torch.zeros(width),
            "running_mean": torch.randn(width, generator=gen), "running_var": torch.rand(width, generator=gen) + 0.5,
            "num_batches_tracked": torch.tensor(100)}


@dataclass
class Source:
    """An intact checkpoint, how to rewrite it from (mutated) tensors, and how it is loaded."""

    name: str
    data: bytes
    tensors: Optional[dict[str, torch.Tensor]]  # the mutable tensor mapping; None: bytes-level cases only
    encode: Optional[Callable[[dict[str, torch.Tensor]], bytes]]
    attempt: Callable[[Path], tuple[nn.Module, dict[str, torch.Tensor], Any]]  # -> (model, before, report)
    prefix: str = ""  # model-key prefix of what the backbone loader fills ("backbone." for build)
    reader: Optional[Callable[[bytes], dict[str, torch.Tensor]]] = None  # only for formats without checksum
    keeps_views: bool = True  # torch.save stores a stride-0 view as one element; .npz / safetensors would expand it


def _loader_attempt(make: Callable[[], nn.Module], load: Callable) -> Callable:
    def attempt(path: Path):
        model = make()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            report = load(model, path)
        except BaseException:
            _assert_unchanged(model, before)
            raise
        return model, before, report
    return attempt


def _build_attempt(name: str, **kw: Any) -> Callable:
    def attempt(path: Path):
        torch.manual_seed(0)
        before = {k: v.clone() for k, v in reid_ms.build(name, **kw).state_dict().items()}
        torch.manual_seed(0)
        model = reid_ms.build(name, pretrained=path, **kw)
        return model, before, model.load_report
    return attempt


def _vit(**kw: Any) -> VitTrans:
    torch.manual_seed(0)
    return VitTrans(**VIT, **kw).eval()


def _clip(**kw: Any) -> ClipVisual:
    torch.manual_seed(0)
    return ClipVisual(**CLIP, **kw).eval()


def _sources(tmp: Path) -> list[Source]:
    timm_sd = {k: v.detach().clone() for k, v in timm_vit(img_size=(64, 64), seed=3).state_dict().items()}
    sources: list[Source] = []
    vit_load = _loader_attempt(_vit, reid_ms.load_vit_weights)
    vit_cam_load = _loader_attempt(lambda: _vit(camera_num=CAMERAS), reid_ms.load_vit_weights)

    def add(name, tensors, encode, attempt, **kw):
        sources.append(Source(name, encode(tensors) if tensors is not None else kw.pop("data"), tensors, encode,
                              attempt, **kw))

    add("timm .pth", dict(timm_sd), _torch_bytes, vit_load)
    add("timm legacy .pth", dict(timm_sd), lambda s: _torch_bytes(s, legacy=True), vit_load,
        reader=lambda b: torch.load(io.BytesIO(b), weights_only=True))
    add("timm wrapped", dict(timm_sd), lambda s: _torch_bytes({"model": s, "epoch": 300, "arch": "vit"}), vit_load)
    deit = dict(timm_sd)
    deit["dist_token"] = torch.randn(1, 1, 32)
    deit["pos_embed"] = torch.cat([timm_sd["pos_embed"][:, :1], torch.randn(1, 1, 32), timm_sd["pos_embed"][:, 1:]], 1)
    deit["head_dist.weight"], deit["head_dist.bias"] = torch.randn(1000, 32), torch.randn(1000)
    add("DeiT .pth", deit, _torch_bytes, vit_load)
    google_npz(timm_sd, 4, tmp / "google.npz")
    with np.load(tmp / "google.npz") as z:
        npz_state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    add("Google .npz", npz_state, _npz_bytes, vit_load, keeps_views=False)
    add(".safetensors", {k: v.contiguous() for k, v in timm_sd.items()}, safetensors_save, vit_load,
        reader=safetensors_load, keeps_views=False)

    torch.manual_seed(5)
    trained = VitTrans(**VIT, camera_num=CAMERAS)
    with torch.no_grad():
        trained.sie_embed.normal_()
    transreid = {f"base.{k}": v.detach().clone() for k, v in trained.state_dict().items()}
    transreid.update({f"bottleneck.{k}": v for k, v in _bnneck(32, 6).items()})
    transreid["classifier.weight"] = torch.randn(CLASSES, 32)
    add("TransReID .pth", transreid, _torch_bytes, vit_cam_load)
    add("TransReID .pth via build", transreid, _torch_bytes,
        _build_attempt("vit_b16", **VIT, camera_num=CAMERAS, num_classes=CLASSES), prefix="backbone.")

    clip_load = _loader_attempt(_clip, reid_ms.load_clip_weights)
    clip_cam_load = _loader_attempt(lambda: _clip(camera_num=CAMERAS), reid_ms.load_clip_weights)
    write_openai_archive(tmp / "openai.pt", OpenAIStyleCLIP(input_resolution=32, patch_size=8, width=64, layers=2,
                                                            heads=4, output_dim=32, seed=4))
    add("OpenAI TorchScript", None, None, clip_load, data=(tmp / "openai.pt").read_bytes())
    oc = {f"module.{k}": v.detach().clone()
          for k, v in open_clip_model(image_size=32, patch_size=8, width=64, layers=2, output_dim=32,
                                      seed=7).state_dict().items()}
    add("open_clip", oc, lambda s: _torch_bytes({"epoch": 10, "name": "run", "state_dict": s}), clip_load)

    torch.manual_seed(8)
    encoder = ClipVisual(**CLIP, camera_num=CAMERAS)
    with torch.no_grad():
        encoder.cv_embed.normal_()
    clip_reid = {f"image_encoder.{k}": v.detach().clone() for k, v in encoder.state_dict().items() if k != "cv_embed"}
    clip_reid["cv_embed"] = encoder.cv_embed.detach().clone()
    clip_reid.update({f"bottleneck.{k}": v for k, v in _bnneck(64, 9).items()})
    clip_reid.update({f"bottleneck_proj.{k}": v for k, v in _bnneck(32, 10).items()})
    clip_reid["classifier.weight"] = torch.randn(CLASSES, 64)
    clip_reid["classifier_proj.weight"] = torch.randn(CLASSES, 32)
    clip_reid["prompt_learner.cls_ctx"] = torch.randn(CLASSES, 4, 32)
    add("CLIP-ReID .pth", clip_reid, _torch_bytes, clip_cam_load)
    add("CLIP-ReID .pth via build", clip_reid, _torch_bytes,
        _build_attempt("clip_b16", **CLIP, camera_num=CAMERAS, num_classes=CLASSES), prefix="backbone.")
    return sources


# -- mutations -------------------------------------------------------------------------------------------------

FLOAT_NAN = np.array([np.nan], dtype=np.float32).tobytes()


def _rezip(data: bytes, edit: Callable[[list[tuple[str, bytes]]], list[tuple[str, bytes]]]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [(n, zf.read(n)) for n in zf.namelist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, payload in edit(members):
            zf.writestr(name, payload)
    return out.getvalue()


def _nan_fill(name: str, payload: bytes) -> bytes:
    if name.endswith(".npy"):  # keep the .npy header, fill the data
        header = 10 + int.from_bytes(payload[8:10], "little")
        body = len(payload) - header
        return payload[:header] + FLOAT_NAN * (body // 4) + b"\0" * (body % 4)
    return FLOAT_NAN * (len(payload) // 4) + b"\0" * (len(payload) % 4)


def _storage_members(members: list[tuple[str, bytes]]) -> list[int]:
    return [i for i, (n, p) in enumerate(members) if ("/data/" in n or n.endswith(".npy")) and len(p) >= 4]


def _bomb(data: bytes, pick: Callable[[list[str]], Optional[str]]) -> bytes:
    """The zip ``data`` with the member ``pick`` chooses replaced by 64 MiB of zeros, deflated (about 64 KiB)."""
    with zipfile.ZipFile(io.BytesIO(data)) as zin:
        victim = pick(zin.namelist())
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as zout:
            for info in zin.infolist():
                if info.filename == victim:
                    zout.writestr(info.filename, bytes(BOMB), compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
                else:
                    zout.writestr(info, zin.read(info.filename))
    return out.getvalue()


def _deep_key(data: bytes) -> bytes:
    """A torch.save zip whose top-level dict gains a tuple key nested 1e5 deep."""
    def edit(members):
        out = []
        for name, payload in members:
            if name.endswith("data.pkl"):
                at = payload.index(b"}") + 3  # after EMPTY_DICT and its BINPUT
                payload = payload[:at] + _op("x") + b"\x85" * 100_000 + _op(1) + b"s" + payload[at:]
            out.append((name, payload))
        return out
    return _rezip(data, edit)


def resource_cases(src: Source, rng: random.Random) -> list[tuple[str, bytes]]:
    """Small files declaring large or deep things: zip bombs, deep keys and records."""
    if not zipfile.is_zipfile(io.BytesIO(src.data)):
        return []
    storage = lambda names: rng.choice([n for n in names if "/data/" in n or n.endswith(".npy")])  # noqa: E731
    pickle_member = lambda names: next((n for n in names if n.endswith("data.pkl")), names[0])  # noqa: E731
    cases = [("zip bomb: a storage member inflating to 64 MiB", _bomb(src.data, storage)),
             ("zip bomb: the pickle member inflating to 64 MiB", _bomb(src.data, pickle_member))]
    with zipfile.ZipFile(io.BytesIO(src.data)) as zf:
        names = zf.namelist()
    if any(n.endswith("constants.pkl") for n in names):
        deep = b"\x80\x02" + ts_nested(2000, ts_record({"w": ts_tensor("0", 1, (1,), (1,))})) + b"."
        cases.append(("2000 nested TorchScript records", _rezip(src.data, lambda m: [
            (n, deep if n.endswith("data.pkl") else p) for n, p in m])))
    elif any(n.endswith("data.pkl") for n in names):
        cases.append(("tuple key nested 1e5 deep", _deep_key(src.data)))
    return cases


def byte_cases(src: Source, rng: random.Random) -> list[tuple[str, bytes]]:
    data = src.data
    n = len(data)
    cases = [(f"truncated to {c} bytes", data[:c])
             for c in sorted({0, 1, 8, 9, n // 10, n // 4, n // 2, 3 * n // 4, n - 100, n - 1})]
    for i in range(14):
        # half anywhere, half in the first / last KiB (pickles, zip directories, safetensors header)
        pos = rng.randrange(n) if i % 2 == 0 else (rng.randrange(min(1024, n)) if i % 4 == 1 else
                                                   n - 1 - rng.randrange(min(1024, n)))
        flipped = bytearray(data)
        flipped[pos] ^= rng.randrange(1, 256)
        cases.append((f"byte {pos} flipped", bytes(flipped)))
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
        victim = rng.choice(names)
        pickle_member = next((x for x in names if x.endswith("data.pkl")), names[0])

        def pick_storage(members):
            idx = _storage_members(members)
            return idx[rng.randrange(len(idx))] if idx else None

        def nan_storage(members):
            i = pick_storage(members)
            return [(nm, _nan_fill(nm, p) if j == i else p) for j, (nm, p) in enumerate(members)]

        def halve_storage(members):
            i = pick_storage(members)
            return [(nm, p[: len(p) // 2] if j == i else p) for j, (nm, p) in enumerate(members)]

        cases += [
            ("zip repacked unchanged", _rezip(data, lambda m: m)),
            (f"zip member {victim} dropped", _rezip(data, lambda m: [x for x in m if x[0] != victim])),
            ("zip member added", _rezip(data, lambda m: m + [(m[0][0].split("/")[0] + "/extra.npy"
                                                               if "/" in m[0][0] else "extra.npy", b"\x93NUMPY")])),
            (f"zip member {victim} renamed", _rezip(data, lambda m: [(x[0] + "_x" if x[0] == victim else x[0], x[1])
                                                                     for x in m])),
            ("zip storage NaN-filled", _rezip(data, nan_storage)),
            ("zip storage halved", _rezip(data, halve_storage)),
            (f"zip {pickle_member} garbage", _rezip(data, lambda m: [(x[0], bytes(rng.randrange(256) for _ in
                                                                                 range(64))
                                                                    if x[0] == pickle_member else x[1]) for x in m])),
        ]
    return cases


def tensor_cases(src: Source, rng: random.Random) -> list[tuple[str, dict[str, torch.Tensor]]]:
    float_keys = sorted(k for k, v in src.tensors.items() if v.is_floating_point() and v.numel() > 1)
    cases = []

    def key():
        return rng.choice(float_keys)

    def mutate(name, k, fn):
        state = dict(src.tensors)
        fn(state, k)
        cases.append((f"{name} ({k})", state))

    def off_by_one(state, k, delta):
        v = state[k]
        d = rng.randrange(v.dim())
        shape = list(v.shape)
        shape[d] += delta
        state[k] = torch.randn(shape) if shape[d] > 0 else v.narrow(d, 0, 0)

    mutate("int32", key(), lambda s, k: s.__setitem__(k, (s[k] * 100).to(torch.int32)))
    mutate("int64", key(), lambda s, k: s.__setitem__(k, s[k].to(torch.int64)))
    mutate("bool", key(), lambda s, k: s.__setitem__(k, s[k] > 0))
    mutate("complex64", key(), lambda s, k: s.__setitem__(k, s[k].to(torch.complex64)))
    mutate("float64", key(), lambda s, k: s.__setitem__(k, s[k].double()))
    mutate("NaN-filled", key(), lambda s, k: s.__setitem__(k, torch.full_like(s[k], float("nan"))))
    mutate("one inf", key(), lambda s, k: s.__setitem__(k, s[k].flatten().index_fill(0, torch.tensor([0]),
                                                                                       float("inf")).view_as(s[k])))
    mutate("shape +1", key(), lambda s, k: off_by_one(s, k, 1))
    mutate("shape -1", key(), lambda s, k: off_by_one(s, k, -1))
    if src.keeps_views:
        pos = next((k for k in float_keys if k.endswith(("pos_embed", "positional_embedding"))), key())

        def wide(s, k):  # a few bytes on disk declaring 2^26 columns
            s[k] = torch.zeros(1).expand(*s[k].shape[:-1], 1 << 26)

        def grid(s, k):  # the model's width, an 8192 x 8192 grid (8 GiB as float32)
            s[k] = torch.zeros(1).expand(*s[k].shape[:-2], 1 + (1 << 26), s[k].shape[-1])

        mutate("stride-0 view of 2^26 columns", pos, wide)
        mutate("stride-0 view of 2^26 columns", key(), wide)
        mutate("stride-0 view of an 8192x8192 grid", pos, grid)
    mutate("key renamed", key(), lambda s, k: s.__setitem__(k + "_renamed", s.pop(k)))
    mutate("key dropped", key(), lambda s, k: s.pop(k))
    mutate("key added", "extra.weight", lambda s, k: s.__setitem__(k, torch.randn(4)))
    return cases


# -- the checks ------------------------------------------------------------------------------------------------


class Hang(Exception):
    pass


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"model changed by a failed load: {k}"


def _kept(report) -> set[str]:
    """Model keys the report says were not filled from the file (table without a file entry, unfit head)."""
    return set(report.kept_init)


def _stored_bytes_loaded(src: Source, model, intact, damaged: bytes, kept: set[str]) -> bool:
    """Whether ``model`` holds exactly what the damaged file stores (formats without checksum)."""
    if src.reader is None:
        return False
    try:
        stored = src.reader(damaged)
    except Exception:
        return False
    original = src.reader(src.data)
    changed = {k for k in original if k not in stored or not torch.equal(stored[k], original[k])}
    if not changed:
        return False
    for k, v in model.state_dict().items():
        if k in kept or torch.equal(v, intact[k]):
            continue
        name = k[len(src.prefix):]
        if name not in changed:
            return False
        # the 4x4 ImageNet position grid is resized to the model's 4x2; any other tensor is copied as stored
        want = bilinear_grid(stored[name], (4, 4), (4, 2)) if name == "pos_embed" else stored[name].to(v.dtype)
        if not torch.equal(v, want):
            return False
    return True


def _on_alarm(signum, frame):
    raise Hang(f"a load ran longer than {SECONDS_PER_LOAD} s")


def _run_case(src: Source, payload: bytes, path: Path, intact: dict[str, torch.Tensor]) -> str:
    path.write_bytes(payload)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_LOAD)
    try:
        model, before, report = src.attempt(path)
    except CheckpointError as e:
        assert str(e), "an error without a message"
        return type(e).__name__
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    kept = _kept(report)
    state = model.state_dict()
    if all(torch.equal(v, before[k] if k in kept else intact[k]) for k, v in state.items()):
        differs = any(not torch.equal(before[k], intact[k]) for k in kept)
        return "faithful load, part kept init (reported)" if differs else "faithful load"
    if _stored_bytes_loaded(src, model, intact, payload, kept):
        return "stored values loaded (format without checksum)"
    bad = [k for k, v in state.items() if not torch.equal(v, before[k] if k in kept else intact[k])]
    raise AssertionError(f"loaded without error but not faithfully: {bad[:5]}")


def test_fuzzed_checkpoints_end_in_a_clean_error_or_a_faithful_load(tmp_path, capsys):
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    tally: collections.Counter[str] = collections.Counter()
    failures = []
    worst_memory, worst_time = (0, ""), (0.0, "")
    try:
        for index, src in enumerate(_sources(tmp_path)):
            rng = random.Random(1000 + index)
            intact_path = tmp_path / f"intact{index}"
            intact_path.write_bytes(src.data)
            model, _, _ = src.attempt(intact_path)
            intact = {k: v.clone() for k, v in model.state_dict().items()}
            cases = byte_cases(src, rng) + resource_cases(src, rng)
            if src.tensors is not None:
                cases += [(name, src.encode(state)) for name, state in tensor_cases(src, rng)]
            for name, payload in cases:
                what = f"{src.name}: {name}"
                _reset_peak()
                rss, _ = _memory()
                start = time.perf_counter()
                try:
                    tally[_run_case(src, payload, tmp_path / f"case{index}", intact)] += 1
                except Exception as e:  # collected so one run lists every failing case
                    failures.append(f"{what}: {type(e).__name__}: {str(e)[:300]}")
                seconds, grown = time.perf_counter() - start, _memory()[1] - rss
                worst_memory, worst_time = max(worst_memory, (grown, what)), max(worst_time, (seconds, what))
                if grown > MAX_GROWTH:
                    failures.append(f"{what}: peak memory grew by {grown / MIB:.0f} MiB")
    finally:
        signal.signal(signal.SIGALRM, previous)
    total = sum(tally.values()) + len(failures)
    with capsys.disabled():
        print(f"\nfuzz: {total} cases: " + ", ".join(f"{n} {what}" for what, n in tally.most_common()))
        print(f"fuzz: worst peak memory growth {worst_memory[0] / MIB:.1f} MiB ({worst_memory[1]}); "
              f"worst time {worst_time[0]:.2f} s ({worst_time[1]})")
    assert not failures, "\n".join(failures)
    assert total >= 300
    assert tally["CheckpointError"] > 0 and tally["faithful load"] > 0


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["vit_b16", "clip_b16"])
def test_hostile_file_through_build_pretrained_runs_nothing(tmp_path, name):
    marker = tmp_path / "ran"
    path = tmp_path / "trained.pth"
    torch.save({"base.cls_token": torch.zeros(1, 1, 32), "bottleneck.weight": _Payload(str(marker))}, path)
    kw = VIT if name == "vit_b16" else CLIP
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        reid_ms.build(name, pretrained=path, **kw)
    assert not marker.exists()
