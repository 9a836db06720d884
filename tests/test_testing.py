"""reid_ms.testing: the grid formula, the strategies, and the contract checks on sound and broken modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import reid_ms
from reid_ms import testing as rt


def tiny_vit(**kw) -> reid_ms.VitTrans:
    torch.manual_seed(0)
    return reid_ms.VitTrans(**{**dict(img_size=(64, 32), stride_size=12, embed_dim=16, depth=1, num_heads=2), **kw})


@pytest.mark.parametrize("img, patch, stride, grid", [
    ((256, 128), 16, 16, (16, 8)), ((256, 128), 16, 12, (21, 10)), ((384, 128), 16, 12, (31, 10)),
    ((224, 224), 16, 16, (14, 14)), ((20, 17), (4, 3), (5, 2), (4, 8)), (16, 16, 16, (1, 1)),
])
def test_grid_size_worked_by_hand(img, patch, stride, grid):
    assert rt.grid_size(img, patch, stride) == grid


def test_grid_size_refuses_an_image_smaller_than_the_patch():
    with pytest.raises(reid_ms.ConfigError, match="smaller than patch_size"):
        rt.grid_size((8, 32), 16, 16)


@settings(derandomize=True, deadline=None, max_examples=40)
@given(geo=rt.geometries(max_side=80, max_tokens=101))
def test_geometries_fit_and_match_the_convolution(geo):
    h, w = geo.img_size
    assert 16 <= h <= 80 and 16 <= w <= 80 and 1 <= geo.stride_size <= geo.patch_size <= min(h, w)
    conv = nn.Conv2d(1, 1, geo.patch_size, stride=geo.stride_size)
    assert geo.grid_size == tuple(conv(torch.zeros(1, 1, h, w)).shape[-2:])
    assert geo.num_tokens == 1 + geo.grid_size[0] * geo.grid_size[1] <= 101


@settings(derandomize=True, deadline=None, max_examples=30)
@given(width=rt.widths(4, 40, multiple_of=4), table=rt.label_tables(), scales=rt.scale_sets(max_scale=8))
def test_simple_strategies_stay_in_range(width, table, scales):
    assert width % 4 == 0 and 4 <= width <= 40
    assert 0 <= table[0] <= 8 and 0 <= table[1] <= 4
    assert list(scales) == sorted(set(scales)) and 1 <= len(scales) <= 3 and all(1 <= s <= 8 for s in scales)


@settings(derandomize=True, deadline=None, max_examples=20)
@given(data=rt.label_tables(max_cameras=3, max_views=2).flatmap(lambda t: rt.labels(*t, batch_size=3).map(
    lambda lab: (t, lab))))
def test_labels_fit_their_table(data):
    (camera_num, view_num), (cams, views) = data
    for count, lab in ((camera_num, cams), (view_num, views)):
        if count == 0:
            assert lab is None
        else:
            assert lab.shape == (3,) and lab.dtype == torch.long and 0 <= int(lab.min()) <= int(lab.max()) < count


# --- check_backbone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("camera_num, view_num", [(0, 0), (3, 0), (0, 2), (3, 2)])
def test_library_backbones_pass(camera_num, view_num):
    vit = tiny_vit(camera_num=camera_num, view_num=view_num)
    clip = reid_ms.ClipVisual(img_size=(64, 32), stride_size=12, width=16, layers=1, heads=2, output_dim=8,
                              camera_num=camera_num, view_num=view_num).train()
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    rt.check_backbone(vit)
    rt.check_backbone(clip)
    assert clip.training and all(torch.equal(v, before[k]) for k, v in clip.state_dict().items())


class Broken(nn.Module):
    """A tiny VitTrans behind a faulty forward; it claims the inner model's geometry and tables."""

    def __init__(self, fault: str, camera_num: int = 0, **attrs) -> None:
        super().__init__()
        self.inner = tiny_vit(camera_num=camera_num)
        self.fault = fault
        for name in ("img_size", "patch_size", "stride_size", "grid_size", "out_dim", "in_chans", "camera_num",
                     "view_num"):
            setattr(self, name, attrs.get(name, getattr(self.inner, name)))

    def forward(self, images, cam_label=None, view_label=None):
        if self.fault == "crop":  # the bottom rows of the image never seen
            images = torch.cat([images[:, :, :-6], torch.zeros_like(images[:, :, -6:])], dim=2)
        if self.fault == "wrap_labels" and cam_label is not None:  # -1 reads the last row, 3 the first
            cam_label = cam_label % self.camera_num
        if self.fault == "default_label" and cam_label is None:
            cam_label = 0
        out = self.inner(images, cam_label=cam_label, view_label=view_label)
        h, w = self.inner.grid_size
        if self.fault == "drop_token":
            return out[:, :-1]
        if self.fault == "zero_last_row":
            return torch.cat([out[:, :1 + (h - 1) * w], torch.zeros_like(out[:, 1 + (h - 1) * w:])], dim=1)
        if self.fault == "copy_first_row":
            return torch.cat([out[:, :1 + (h - 1) * w], out[:, 1:1 + w]], dim=1)
        if self.fault == "mix_batch":
            return out + out.mean(0, keepdim=True)
        return out


class IgnoresLabels(nn.Module):
    """Declares a camera table, checks the labels, then never uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_vit()
        for name in ("img_size", "patch_size", "stride_size", "grid_size", "out_dim"):
            setattr(self, name, getattr(self.inner, name))
        self.camera_num, self.view_num = 3, 0

    def forward(self, images, cam_label=None, view_label=None):
        if cam_label is None or int(cam_label.min()) < 0 or int(cam_label.max()) >= 3 or view_label is not None:
            raise ValueError("bad labels")
        return self.inner(images)


def test_the_sound_wrapper_passes():
    rt.check_backbone(Broken("none"))
    rt.check_backbone(Broken("none", camera_num=3))


@pytest.mark.parametrize("module, message", [
    (lambda: Broken("drop_token"), r"shape \(2, 10, 16\); expected \[B, 1 \+ H\*W, out_dim\] = \[2, 11, 16\]"),
    (lambda: Broken("zero_last_row"), "token 9 is identical for two different batches"),
    (lambda: Broken("copy_first_row"), "2 duplicated token"),
    (lambda: Broken("crop"), "row 58, column 0 lies under a patch but never reaches the output"),
    (lambda: Broken("none", grid_size=(6, 2)), r"grid_size is \(6, 2\) but .* give \(5, 2\)"),
    (lambda: Broken("none", out_dim=32), r"expected .* = \[2, 11, 32\]"),
    (lambda: Broken("mix_batch"), "change with the other images of its batch"),
    (lambda: Broken("wrap_labels", camera_num=3), "accepted cam_label=-1, outside"),
    (lambda: Broken("default_label", camera_num=3), "ran without cam_label"),
    (lambda: Broken("none", view_num=2), "raised InputError on valid images and labels"),
    (IgnoresLabels, "cam_label=0 and cam_label=2 give identical tokens"),
])
def test_check_backbone_catches(module, message):
    with pytest.raises(AssertionError, match=message):
        rt.check_backbone(module())


def test_check_backbone_catches_a_label_accepted_without_a_table():
    class AcceptsCam(Broken):
        def forward(self, images, cam_label=None, view_label=None):
            return super().forward(images)

    with pytest.raises(AssertionError, match="without a table for cam_label .* accepted cam_label=0"):
        rt.check_backbone(AcceptsCam("none"))


def test_check_backbone_needs_the_attributes():
    module = Broken("none")
    del module.out_dim
    with pytest.raises(AssertionError, match="no 'out_dim' attribute"):
        rt.check_backbone(module)


# --- check_neck ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dense", "light"])
def test_library_necks_pass_and_stay_zero(mode):
    neck = reid_ms.MultiScaleSlidingWindow(8, (2, 4), mode=mode)
    rt.check_neck(neck)
    assert not bool(neck.windows[0].weight.any()) if mode == "dense" else not bool(neck.pointwise.weight.any())


class BrokenNeck(nn.Module):
    def __init__(self, fault: str) -> None:
        super().__init__()
        self.inner = reid_ms.MultiScaleSlidingWindow(8, (2, 4))
        self.feat_dim = 8
        self.fault = fault

    def forward(self, tokens, grid_size):
        h, w = grid_size
        if self.fault == "mean_pool":  # never looks at the grid, so any token count goes through
            return torch.cat([tokens[:, :1] + self.inner.windows[0].bias + tokens[:, 1:].mean(1, keepdim=True),
                              tokens[:, 1:]], dim=1)
        if self.fault == "crop":  # the last column never reaches the CLS
            grid = tokens[:, 1:].reshape(tokens.shape[0], h, w, -1).clone()
            grid[:, :, -1] = 0
            cls = self.inner(torch.cat([tokens[:, :1], grid.flatten(1, 2)], 1), (h, w))[:, :1]
            return torch.cat([cls, tokens[:, 1:]], 1)
        out = self.inner(tokens, (h, w))
        if self.fault == "cls_only":
            return out[:, :1]
        if self.fault == "mix_batch":
            return out + out[:, :1].mean(0, keepdim=True)
        return out


@pytest.mark.parametrize("fault, message", [
    ("none", None),
    ("crop", r"grid \(1, 1\) the patch token at row 0, column 0 never reaches the CLS"),
    ("cls_only", r"on grid \(1, 1\) returned \(\(2, 1, 8\)"),
    ("mean_pool", r"accepted 3 tokens with grid_size \(1, 1\)"),
    ("mix_batch", "changes with the other samples"),
])
def test_check_neck_catches(fault, message):
    if message is None:
        rt.check_neck(BrokenNeck(fault))
        return
    with pytest.raises(AssertionError, match=message):
        rt.check_neck(BrokenNeck(fault))


def test_the_documented_example_runs():
    page = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", page, re.S)
    namespace: dict = {}
    # the page's own example count is what a project would run; two examples each prove it runs here
    exec(compile(code.replace("max_examples=5", "max_examples=2"), "docs/testing.md", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()
