"""Bad inputs to the backbones, the neck and built models: each ends in an InputError (or ConfigError for
constructor arguments) whose message names the argument and the value expected.

Choices made (see docs/reliability.md):
- images must have the floating dtype of the model's weights; nothing is cast silently (a float64 batch
  is refused, not rounded). Under ``torch.autocast`` float16 / bfloat16 / float32 images are accepted
  because autocast casts them per operation; float64 is not cast by autocast and stays refused.
- camera / view labels given to a model built without a table are an error, not ignored.
"""

from __future__ import annotations

import re

import pytest
import torch

import reid_ms
from reid_ms import ClipVisual, ConfigError, InputError, MultiScaleSlidingWindow, VitTrans

IMG = (64, 32)
VIT = dict(img_size=IMG, embed_dim=32, depth=1, num_heads=4, drop_path_rate=0.0)
CLIP = dict(img_size=IMG, width=32, layers=1, heads=4, output_dim=16)


def _vit(**kw):
    return VitTrans(**VIT, **kw).eval()


def _clip(**kw):
    return ClipVisual(**CLIP, **kw).eval()


def _built(name):
    def make(**kw):
        args = dict(VIT) if name.startswith("vit") else dict(CLIP)
        return reid_ms.build(name, scales=(2, 4), **args, **kw).eval()
    return make


MODELS = {"VitTrans": _vit, "ClipVisual": _clip, "vit_b16_ms": _built("vit_b16_ms"),
          "clip_b16_adapt_ms_light": _built("clip_b16_adapt_ms_light")}
OWNER = {"VitTrans": "VitTrans", "ClipVisual": "ClipVisual", "vit_b16_ms": "VitTrans",
         "clip_b16_adapt_ms_light": "ClipVisual"}


def images(b=2, c=3, h=IMG[0], w=IMG[1], dtype=torch.float32):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)


def raises(exc, *fragments):
    """pytest.raises that also checks each fragment appears in the message (as plain text)."""
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments))


@pytest.fixture(params=list(MODELS), scope="module")
def name(request):
    return request.param


@pytest.fixture(scope="module")
def plain(name):
    return MODELS[name]()


@pytest.fixture(scope="module")
def with_table(name):
    return MODELS[name](camera_num=3, view_num=2)


# -- images ----------------------------------------------------------------------------------------------------


def test_good_call_works(plain, with_table):
    # the reference the error cases differ from by one thing
    with torch.no_grad():
        assert torch.isfinite(plain(images())).all()
        assert torch.isfinite(with_table(images(), cam_label=[0, 2], view_label=torch.tensor([1, 0]))).all()


def test_wrong_channel_count(plain, name):
    with raises(InputError, OWNER[name], "in_chans=3", "1 channels"):
        plain(images(c=1))


def test_wrong_size(plain, name):
    with raises(InputError, OWNER[name], "64x32", "got 32x32", "img_size=(32, 32)"):
        plain(images(h=32))


def test_missing_batch_dimension(plain):
    with raises(InputError, "[B, C, H, W]", "3-D", "unsqueeze(0)"):
        plain(images()[0])


def test_not_a_tensor(plain):
    with raises(InputError, "expects a tensor of images", "list"):
        plain([images()])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64])
def test_non_float_images(plain, dtype):
    with raises(InputError, "floating-point images", str(dtype), "images.float()"):
        plain(images().to(dtype) if dtype != torch.bool else images() > 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_float_images_of_another_dtype_are_refused_not_cast(plain, dtype):
    with raises(InputError, "torch.float32 weights", f"dtype {dtype}", "images.to(torch.float32)"):
        plain(images(dtype=dtype))


def test_images_must_follow_a_converted_model(name):
    model = MODELS[name]().double()
    with raises(InputError, "torch.float64 weights", "dtype torch.float32"):
        model(images())
    with torch.no_grad():
        assert model(images(dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_accepts_the_dtypes_it_casts(plain, dtype):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = plain(images(dtype=dtype))
    assert torch.isfinite(out.float()).all()


def test_autocast_does_not_cast_float64(plain):
    with torch.autocast("cpu", dtype=torch.bfloat16), raises(InputError, "dtype torch.float64"):
        plain(images(dtype=torch.float64))


def test_empty_batch(plain):
    with raises(InputError, "empty batch", "(0, 3, 64, 32)"):
        plain(images(b=0))


# -- camera / view labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, fragments", [
    (-1, ["cam_label must lie in [0, 2]", "camera_num=3", "from -1 to -1", "0-based"]),
    ([0, 3], ["cam_label must lie in [0, 2]", "camera_num=3", "from 0 to 3"]),
    (torch.tensor([5, 1]), ["cam_label must lie in [0, 2]", "from 1 to 5"]),
    (2 ** 70, ["cam_label", "64-bit integer"]),
    ([0, 1, 2], ["cam_label must hold one label per image (2)", "shape (3,)"]),
    (torch.zeros(2, 1, dtype=torch.long), ["cam_label must hold one label per image (2)", "shape (2, 1)"]),
    (torch.tensor([0.0, 1.0]), ["cam_label must hold integer labels", "torch.float32", "cam_label.long()"]),
    (torch.tensor([True, False]), ["cam_label must hold integer labels", "torch.bool"]),
    ([0.0, 1.0], ["cam_label must be an int, a sequence of ints or an integer tensor", "[0.0, 1.0]"]),
    ("0", ["cam_label must be an int, a sequence of ints or an integer tensor", "'0'"]),
])
def test_bad_camera_labels(with_table, label, fragments):
    with raises(InputError, *fragments):
        with_table(images(), cam_label=label, view_label=0)


@pytest.mark.parametrize("label, fragments", [
    (-2, ["view_label must lie in [0, 1]", "view_num=2", "from -2 to -2"]),
    ([1, 2], ["view_label must lie in [0, 1]", "view_num=2"]),
    ([1], ["view_label must hold one label per image (2)", "shape (1,)"]),
    (torch.tensor([0.5, 1.0]), ["view_label must hold integer labels", "torch.float32"]),
])
def test_bad_view_labels(with_table, label, fragments):
    with raises(InputError, *fragments):
        with_table(images(), cam_label=0, view_label=label)


def test_missing_labels_on_a_model_with_a_table(with_table, name):
    with raises(InputError, OWNER[name], "camera_num=3", "needs cam_label", "[0, 2]"):
        with_table(images())
    with raises(InputError, "view_num=2", "needs view_label", "[0, 1]"):
        with_table(images(), cam_label=0)


@pytest.mark.parametrize("argument, table", [("cam_label", "camera_num"), ("view_label", "view_num")])
def test_labels_for_a_model_without_a_table_are_an_error(plain, name, argument, table):
    # chosen over ignoring them with a warning: a model trained with SIE and rebuilt without camera_num
    # would otherwise give camera-blind features without anyone noticing
    with raises(InputError, OWNER[name], f"{table}=0", f"but got {argument}", f"build it with {table}="):
        plain(images(), **{argument: [0, 1]})


# -- the neck --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def neck():
    return MultiScaleSlidingWindow(32, scales=(2, 4)).eval()


@pytest.mark.parametrize("grid, fragments", [
    ((3, 3), ["grid_size=(3, 3)", "1 + 3*3 = 10 tokens", "(2, 9, 32)"]),
    ((4, 2, 1), ["grid_size=(H, W), two positive ints", "(4, 2, 1)"]),
    ((4.0, 2.0), ["grid_size=(H, W), two positive ints", "(4.0, 2.0)"]),
    ((0, 8), ["grid_size=(H, W), two positive ints", "(0, 8)"]),
    (None, ["grid_size=(H, W), two positive ints", "None"]),
])
def test_neck_with_a_wrong_grid(neck, grid, fragments):
    tokens = torch.randn(2, 1 + 4 * 2, 32)
    with raises(InputError, *fragments):
        neck(tokens, grid)


def test_neck_with_tokens_of_another_width(neck):
    with raises(InputError, "feat_dim=32", "width 16", "DimAdapter"):
        neck(torch.randn(2, 9, 16), (4, 2))


# -- constructor arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(camera_num=-1), ["camera_num and view_num must be >= 0", "-1"]),
    (dict(camera_num=2.5), ["camera_num must be an int >= 0", "2.5"]),
    (dict(view_num="3"), ["view_num must be an int >= 0", "'3'"]),
    (dict(img_size=(64,)), ["img_size must be an int or a pair of ints", "(64,)"]),
    (dict(stride_size=0), ["stride_size must be positive", "(0, 0)"]),
])
@pytest.mark.parametrize("cls", [VitTrans, ClipVisual])
def test_bad_constructor_arguments(cls, kwargs, fragments):
    base = dict(VIT if cls is VitTrans else CLIP)
    base.update(kwargs)
    with raises(ConfigError, *fragments):
        cls(**base)


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(mlp_ratio=-1.0), ["mlp_ratio must be positive", "-1.0"]),
    (dict(drop_rate=1.5), ["drop_rate must lie in [0, 1)", "1.5"]),
    (dict(attn_drop_rate=-0.1), ["attn_drop_rate must lie in [0, 1)", "-0.1"]),
    (dict(drop_path_rate=1.0), ["drop_path_rate must lie in [0, 1)", "1.0"]),
])
def test_bad_vit_rates(kwargs, fragments):
    with raises(ConfigError, "VitTrans", *fragments):
        VitTrans(**{**VIT, **kwargs})
