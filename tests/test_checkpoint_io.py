"""Reading checkpoint containers: formats told from bytes, hostile files refused, damaged files named."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from reid_ms.errors import CheckpointError, CheckpointNotFoundError, UnsafeCheckpointError
from reid_ms.weights._common import LoadReport, load_all_or_nothing, resize_pos_grid
from reid_ms.weights._io import (
    FORMAT_NPZ,
    FORMAT_SAFETENSORS,
    FORMAT_TORCH,
    flatten_state_dict,
    read_checkpoint,
)


class _Payload:
    """Unpickling this would create a marker file: proof that code from the file ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "b": torch.arange(5)}


@pytest.mark.parametrize("suffix", [".pth", ".bin", ""])
def test_torch_save_read_regardless_of_name(tmp_path, tensors, suffix):
    path = tmp_path / f"ckpt{suffix}"
    torch.save(tensors, path)
    obj, fmt = read_checkpoint(path)
    assert fmt == FORMAT_TORCH
    assert obj.keys() == tensors.keys() and all(torch.equal(obj[k], tensors[k]) for k in tensors)


def test_legacy_torch_save_format(tmp_path, tensors):
    path = tmp_path / "legacy.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    obj, fmt = read_checkpoint(path)
    assert fmt == FORMAT_TORCH and torch.equal(obj["a.weight"], tensors["a.weight"])


def test_npz_and_safetensors_told_from_content(tmp_path, tensors):
    # Names that lie about the content: the bytes decide.
    npz = tmp_path / "weights.safetensors"
    with open(npz, "wb") as f:
        np.savez(f, **{k: v.numpy() for k, v in tensors.items()})
    st = tmp_path / "weights.npz"
    save_file(tensors, str(st))
    obj, fmt = read_checkpoint(npz)
    assert fmt == FORMAT_NPZ and torch.equal(obj["a.weight"], tensors["a.weight"])
    obj, fmt = read_checkpoint(st)
    assert fmt == FORMAT_SAFETENSORS and torch.equal(obj["b"], tensors["b"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path)


def test_unknown_bytes(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_truncated_torch_file(tmp_path, tensors, cut):
    path = tmp_path / "t.pth"
    torch.save(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[: max(10, int(len(data) * cut))])
    with pytest.raises(CheckpointError, match="t.pth"):
        read_checkpoint(path)


def test_truncated_safetensors(tmp_path, tensors):
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(path)


def test_reduce_payload_in_torch_save_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        read_checkpoint(path)
    assert not marker.exists()


def test_reduce_payload_in_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


def test_object_array_in_npz_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.npz"
    payload = np.empty(1, dtype=object)
    payload[0] = _Payload(str(marker))
    np.savez(path, w=np.zeros(3, dtype=np.float32), evil=payload)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        obj, _ = read_checkpoint(path)
    assert not marker.exists()


def test_zip_with_foreign_members_is_not_npz(tmp_path):
    path = tmp_path / "odd.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "no tensors here")
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_flatten_unwraps_and_reports(tensors):
    obj = {"model": tensors, "epoch": 3, "optimizer": {"lr": 0.1}}
    flat, ignored = flatten_state_dict(obj, "f.pth")
    assert flat.keys() == tensors.keys()
    assert ignored == {"epoch": "wrapper entry", "optimizer": "wrapper entry"}
    flat, _ = flatten_state_dict({"state_dict": {"module": tensors}}, "f.pth")
    assert flat.keys() == tensors.keys()
    flat, ignored = flatten_state_dict({**tensors, "input_resolution": 224}, "f.pth")
    assert flat.keys() == tensors.keys() and ignored == {"input_resolution": "not a tensor"}
    with pytest.raises(CheckpointError, match="no tensors"):
        flatten_state_dict({"epoch": 1}, "f.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        flatten_state_dict([torch.zeros(1)], "f.pth")


@pytest.mark.parametrize("old,new", [((14, 14), (16, 8)), ((14, 14), (21, 10)), ((3, 5), (7, 2)), ((4, 4), (4, 4))])
def test_resize_pos_grid_is_bilinear_without_antialias(old, new):
    g = torch.randn(old[0] * old[1], 6)
    out = resize_pos_grid(g, old, new)
    # The oracle: the 2-D grid interpolated directly, channels first.
    ref = torch.nn.functional.interpolate(
        g.T.reshape(1, 6, *old), size=new, mode="bilinear", align_corners=False
    ).reshape(6, -1).T
    assert out.shape == (new[0] * new[1], 6)
    assert torch.equal(out, ref)


def _report() -> LoadReport:
    return LoadReport(path="f.pth", format=FORMAT_TORCH, kind="test")


def test_load_all_or_nothing_leaves_model_untouched_on_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {k: torch.randn_like(v) for k, v in before.items()}
    bad_shape = dict(good, **{"1.bias": torch.zeros(5)})
    missing = {k: v for k, v in good.items() if k != "0.bias"}
    extra = dict(good, extra=torch.zeros(1))
    nan = dict(good, **{"0.weight": torch.full((4, 3), float("nan"))})
    for state, match in ((bad_shape, "1.bias"), (missing, "0.bias"), (extra, "extra"), (nan, "NaN")):
        with pytest.raises(CheckpointError, match=match):
            load_all_or_nothing(model, state, _report())
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    report = load_all_or_nothing(model, {k: v.half() for k, v in good.items()}, _report())
    assert model[0].weight.dtype == torch.float32
    assert torch.equal(model[0].weight, good["0.weight"].half().float())
    assert report.loaded == sorted(good)


def test_load_report_is_structured_with_short_reprs():
    report = LoadReport(path="<b>f.pth", format=FORMAT_TORCH, kind="transreid",
                        loaded=[f"blocks.{i}.weight" for i in range(200)],
                        ignored={f"classifier_{i}.weight": "re-ID head" for i in range(500)},
                        resized={"pos_embed": ((1, 197, 768), (1, 129, 768))}, kept_init=["sie_embed"])
    assert report.ignored["classifier_3.weight"] == "re-ID head"
    text = repr(report)
    assert len(text) < 250, text  # a notebook or a log shows a summary, not 700 keys
    for part in ("kind='transreid'", "loaded=200", "ignored=500", "resized=['pos_embed']", "kept_init=1"):
        assert part in text
    html = report._repr_html_()
    assert len(html) < 1500 and html.startswith("<table")
    assert "&lt;b&gt;f.pth" in html and "<b>f.pth" not in html  # the path is escaped
    assert "200 tensors" in html and "(500 in all)" in html and "[1, 197, 768] &rarr; [1, 129, 768]" in html
    assert "(500 in all)" in str(report)


def test_one_prefix_strip_for_every_filter():
    from reid_ms.weights._io import strip_prefix

    assert strip_prefix({"module.a": 1, "module.b": 2}) == ({"a": 1, "b": 2}, True)
    assert strip_prefix({"module.a": 1, "b": 2}) == ({"module.a": 1, "b": 2}, False)
    assert strip_prefix({}) == ({}, False)
