"""The TorchScript archive reader: OpenAI's ViT-B-16.pt layout read without running TorchScript."""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile

import pytest
import torch
from torch import nn

from _helpers_clip import (OpenAIStyleCLIP, clip_reid_forward, clip_reid_resize, convert_to_openai_fp16,
                           write_openai_archive)
from reid_ms import CheckpointError, ClipVisual, UnsafeCheckpointError, load_clip_weights
from reid_ms.weights._io import read_checkpoint
from reid_ms.weights.torchscript import read_torchscript_archive

TINY_OPENAI = dict(input_resolution=32, patch_size=8, width=64, layers=2, heads=4, output_dim=32)
TINY_MODEL = dict(img_size=(32, 32), patch_size=8, stride_size=8, width=64, layers=2, heads=4, output_dim=32)


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory):
    """``(path, state_dict)`` of a traced OpenAI-style CLIP: fp16 conv/linear, fp32 embeddings and norms."""
    model = convert_to_openai_fp16(OpenAIStyleCLIP(**TINY_OPENAI))
    path = tmp_path_factory.mktemp("ts") / "ViT-tiny.pt"
    write_openai_archive(path, model)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def _rewrite(src, dst, replace: dict[str, bytes | None]) -> None:
    """Copy a zip, replacing members by name (``None`` drops the member)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            suffix = name.split("/", 1)[1]
            if suffix in replace:
                if replace[suffix] is not None:
                    zout.writestr(name, replace[suffix])
            else:
                zout.writestr(name, zin.read(name))


def _unicode(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def test_reads_every_tensor_with_its_dtype(openai_archive):
    path, state = openai_archive
    got = read_torchscript_archive(path)
    assert set(got) == set(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k
    assert got["visual.conv1.weight"].dtype == torch.float16
    assert got["visual.transformer.resblocks.1.attn.in_proj_weight"].dtype == torch.float16
    assert got["visual.positional_embedding"].dtype == torch.float32
    assert got["visual.ln_post.weight"].dtype == torch.float32
    assert int(got["input_resolution"]) == 32 and int(got["context_length"]) == 16 and int(got["vocab_size"]) == 100
    assert read_checkpoint(path)[1] == "torchscript"


def test_no_torchscript_runs_and_archive_equals_plain_dict(openai_archive, tmp_path, monkeypatch):
    path, state = openai_archive
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    from_dict = ClipVisual(**TINY_MODEL)
    from_ts = ClipVisual(**TINY_MODEL)
    load_clip_weights(from_dict, plain)

    def refuse(*args, **kwargs):
        raise AssertionError("TorchScript must not be loaded")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module_from_buffer", refuse)
    report = load_clip_weights(from_ts, path)
    assert report.kind == "openai" and report.format == "torchscript"
    assert not report.resized and not report.kept_init
    for k, v in from_dict.state_dict().items():
        assert torch.equal(from_ts.state_dict()[k], v), k
    ignored = " ".join(report.ignored)
    for k in ("token_embedding.weight", "ln_final.weight", "text_projection", "logit_scale", "input_resolution",
              "transformer.resblocks.0.attn.in_proj_weight", "positional_embedding"):
        assert k in ignored
    assert len(report.loaded) == len(from_ts.state_dict())


def test_loaded_model_matches_openai_forward(openai_archive):
    """The OpenAI-style module (torch's MultiheadAttention, sequence first) in fp32 is the oracle."""
    path, state = openai_archive
    oracle = OpenAIStyleCLIP(**TINY_OPENAI)
    oracle.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model = ClipVisual(**TINY_MODEL).eval()
    load_clip_weights(model, path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, 0], oracle.float()(x), atol=1e-5, rtol=1e-5)


def test_resized_to_a_reid_grid_and_hand_forward_agrees(openai_archive):
    """14x14-style square table to a tall overlapping grid: CLIP-ReID's resize and forward, written out."""
    path, state = openai_archive
    model = ClipVisual(img_size=(48, 24), patch_size=8, stride_size=6, width=64, layers=2, heads=4,
                       output_dim=32).eval()
    report = load_clip_weights(model, path)
    assert model.grid_size == (7, 3)
    assert report.resized["positional_embedding"] == ((17, 64), (22, 64))
    visual = {k[len("visual."):]: v.float() for k, v in state.items() if k.startswith("visual.")}
    visual["positional_embedding"] = clip_reid_resize(visual["positional_embedding"], (4, 4), (7, 3))
    x = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        x12, xproj = clip_reid_forward(visual, x, stride=6, heads=4)
        torch.testing.assert_close(model(x, project=False), x12, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), xproj, atol=1e-5, rtol=1e-5)


def test_scripted_module_integer_attributes_come_through(tmp_path):
    class Meta(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_resolution = 224
            self.flag = True
            self.proj = nn.Linear(4, 2)
            self.register_buffer("vocab_size", torch.tensor(49408))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * self.input_resolution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(Meta())
    scripted.save(str(tmp_path / "meta.pt"))
    got = read_torchscript_archive(tmp_path / "meta.pt")
    assert got["input_resolution"] == 224 and isinstance(got["input_resolution"], int)
    assert "flag" not in got and "training" not in got  # booleans are module flags, not weights
    assert torch.equal(got["proj.weight"], scripted.proj.weight.detach())
    assert int(got["vocab_size"]) == 49408


@pytest.mark.parametrize("payload", ["reduce", "global_eval", "nested"])
def test_foreign_classes_are_refused_and_never_run(openai_archive, tmp_path, payload):
    path, _ = openai_archive
    marker = tmp_path / "pwned"
    if payload == "reduce":
        class Evil:
            def __reduce__(self):
                return os.system, (f"touch {marker}",)

        data = pickle.dumps(Evil(), protocol=2)
        refused = "system"
    elif payload == "global_eval":
        class Evil:
            def __reduce__(self):
                return eval, (f"open({str(marker)!r}, 'w').close()",)

        data = pickle.dumps(Evil(), protocol=2)
        refused = r"builtin__\.eval|builtins\.eval"
    else:
        # A module record whose attribute is built by os.system: the refusal must happen inside the tree.
        data = (b"\x80\x02c__torch__\nCLIP\n)\x81}(" + _unicode("logit_scale") + b"cos\nsystem\n"
                + _unicode(f"touch {marker}") + b"\x85Rub.")
        refused = "os.system"
    bad = tmp_path / "bad.pt"
    _rewrite(path, bad, {"data.pkl": data})
    with pytest.raises(UnsafeCheckpointError, match=refused):
        read_torchscript_archive(bad)
    model = ClipVisual(**TINY_MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError):
        load_clip_weights(model, bad)
    assert not marker.exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_storage_outside_the_archive_is_refused(openai_archive, tmp_path):
    path, _ = openai_archive
    data = (b"\x80\x02c__torch__\nCLIP\n)\x81}(" + _unicode("w") + b"(" + _unicode("file") + _unicode("/etc/passwd")
            + b"tQub.")
    bad = tmp_path / "pid.pt"
    _rewrite(path, bad, {"data.pkl": data})
    with pytest.raises(UnsafeCheckpointError, match="external object"):
        read_torchscript_archive(bad)


def test_damaged_archives_are_named(openai_archive, tmp_path):
    path, _ = openai_archive
    missing = tmp_path / "missing.pt"
    _rewrite(path, missing, {"data/3": None})
    with pytest.raises(CheckpointError, match="data/3"):
        read_torchscript_archive(missing)

    short = tmp_path / "short.pt"
    _rewrite(path, short, {"data/3": b"\x00\x01"})
    with pytest.raises(CheckpointError, match="truncated"):
        read_torchscript_archive(short)

    cut = tmp_path / "cut.pt"
    raw = path.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    model = ClipVisual(**TINY_MODEL)
    with pytest.raises(CheckpointError, match="damaged"):
        load_clip_weights(model, cut)

    nopkl = tmp_path / "nopkl.pt"
    _rewrite(path, nopkl, {"data.pkl": b"\x80\x02c__torch__\nCLIP\n)\x81"})  # stops mid-stream
    with pytest.raises(CheckpointError, match="damaged"):
        read_torchscript_archive(nopkl)


# -- only the allow-list unpickles; big-endian storages are swapped --------------------------------------------

from _helpers_hostile import _op, ts_archive, ts_record, ts_tensor  # noqa: E402


def _payload_archive(tmp_path, module: str, name: str, args: tuple) -> str:
    call = f"c{module}\n{name}\n".encode() + _op(args) + b"R"
    record = ts_record({"visual": ts_record({"class_embedding": ts_tensor("0", 4, (4,), (1,)), "evil": call})})
    return str(ts_archive(tmp_path / f"{module}.{name}.pt", record, {"0": bytes(16)}))


@pytest.mark.parametrize("module, name, args", [
    ("torch.serialization", "save", (1, "{marker}")),
    ("torch", "save", (1, "{marker}")),
    ("torch", "load", ("{marker}",)),
    ("torch.jit", "load", ("{marker}",)),
    ("torch.hub", "load", ("{marker}", "model")),
    ("torch.storage", "_load_from_bytes", ("{marker}",)),
    ("torch._C", "_set_warnAlways", (True,)),
    ("torch.nn.modules.module", "Module", ()),
    ("torch", "FloatTensor", (3,)),
    ("torch._utils", "_rebuild_device_tensor_from_numpy", ("{marker}",)),
    ("builtins", "getattr", ("{marker}", "upper")),
    ("builtins", "__import__", ("os",)),
    ("builtins", "open", ("{marker}", "w")),
    ("__builtin__", "exec", ("open({marker!r}, 'w').close()",)),
    ("posix", "system", ("touch {marker}",)),
    ("subprocess", "run", (["touch", "{marker}"],)),
    ("numpy", "load", ("{marker}",)),
])
def test_every_global_outside_the_allow_list_is_refused_unrun(tmp_path, module, name, args):
    marker = str(tmp_path / "written")
    args = tuple([a.format(marker=marker) for a in x] if isinstance(x, list)
                 else x.format(marker=marker) if isinstance(x, str) else x for x in args)
    path = _payload_archive(tmp_path, module, name, args)
    with pytest.raises(UnsafeCheckpointError, match=f"asks to create {module}.{name},"):
        read_torchscript_archive(path)
    with pytest.raises(UnsafeCheckpointError):
        load_clip_weights(ClipVisual(**TINY_MODEL), path)
    assert not os.path.exists(marker)


def test_the_allowed_globals_are_the_readers_own_stand_ins(tmp_path):
    """The tensor rebuild functions resolve to the reader's checked versions, never torch's own."""
    import torch._utils as torch_utils
    from reid_ms.weights import torchscript

    for (module, name), stand_in in torchscript._ALLOWED_FUNCTIONS.items():
        real = getattr(__import__(module, fromlist=[name]), name)
        assert stand_in is not real or (module, name) == ("collections", "OrderedDict"), (module, name)
    assert set(torchscript._ALLOWED_FUNCTIONS) == {
        ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"), ("collections", "OrderedDict")}
    assert torch_utils._rebuild_tensor_v2 not in torchscript._ALLOWED_FUNCTIONS.values()


@pytest.mark.parametrize("dtype, storage, values", [
    (torch.float32, "FloatStorage", [1.5, -2.25, 3.0e-3, 7.0e8]),
    (torch.float16, "HalfStorage", [1.5, -2.25, 0.125, 1000.0]),
    (torch.int64, "LongStorage", [1, -2, 3 << 40, 7]),
])
def test_big_endian_storages_are_swapped(tmp_path, dtype, storage, values):
    expected = torch.tensor(values, dtype=dtype)
    little = expected.numpy().tobytes()
    big = expected.numpy().byteswap().tobytes()
    record = ts_record({"w": ts_tensor("0", 4, (4,), (1,), storage=storage)})
    for order, raw in (("big", big), ("little", little)):
        got = read_torchscript_archive(ts_archive(tmp_path / f"{order}.pt", record, {"0": raw}, byteorder=order))
        assert torch.equal(got["w"], expected), order
