"""ClipVisual against open_clip's VisionTransformer and CLIP-ReID's forward written out by hand."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers_clip import TINY, clip_reid_forward, open_clip_tokens, open_clip_visual
from reid_ms import ClipVisual
from reid_ms import testing as rt


def _tiny(**kw) -> ClipVisual:
    args = dict(img_size=(64, 32), **TINY)
    args.update(kw)
    return ClipVisual(**args)


@pytest.mark.parametrize("image_size", [(32, 32), (64, 32)])
def test_matches_open_clip_vision_transformer(image_size):
    oracle = open_clip_visual(image_size=image_size)
    model = _tiny(img_size=image_size).eval()
    model.load_state_dict(oracle.state_dict(), strict=True)  # same parameter names, no mapping
    x = torch.randn(3, 3, *image_size)
    with torch.no_grad():
        pooled, tokens = open_clip_tokens(oracle, x)
        out, width_tokens = model(x), model(x, project=False)
    assert out.shape == (3, 1 + model.num_patches, 32) and width_tokens.shape == (3, 1 + model.num_patches, 64)
    torch.testing.assert_close(out[:, 0], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(width_tokens, tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, tokens @ oracle.proj, atol=1e-5, rtol=1e-5)


def test_camera_view_embedding_on_cls_before_position(tiny):
    model = tiny.backbone("clip", width=64, side_info=True, sie_coef=1.5, vector_noise=0.1).eval()
    assert model.cv_embed.shape == (6, 64) and model.grid_size == (5, 2)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 64, 32)
    cams, views = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        x12, xproj = clip_reid_forward(state, x, stride=12, heads=4, row=cams * 2 + views, sie_coef=1.5)
        torch.testing.assert_close(model(x, cam_label=cams, view_label=views, project=False), x12,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, cam_label=cams, view_label=views), xproj, atol=1e-5, rtol=1e-5)
        # A camera the row rule would confuse (cam * view_num + view) gives another output.
        other = model(x, cam_label=torch.tensor([1, 2, 1, 2]), view_label=views)
        assert not torch.allclose(other[0], xproj[0], atol=1e-4)
        torch.testing.assert_close(other[1:], xproj[1:], atol=1e-5, rtol=1e-5)


def test_camera_only_table_and_int_label(tiny):
    model = tiny.backbone("clip", width=64, stride_size=16, camera_num=4, vector_noise=0.1).eval()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        _, want = clip_reid_forward(state, x, stride=16, heads=4, row=torch.tensor([3, 3]))
        torch.testing.assert_close(model(x, cam_label=3), want, atol=1e-5, rtol=1e-5)


@settings(derandomize=True, deadline=None, max_examples=6)
@given(geo=rt.geometries(max_side=56, patch_sizes=(8, 16), max_tokens=65), heads=st.sampled_from([1, 2, 4]))
def test_any_grid_matches_hand_forward(geo, heads, tiny):
    (h, w), patch, stride = geo
    model = tiny.backbone("clip", img_size=(h, w), patch_size=patch, stride_size=stride, blocks=1, heads=heads,
                          output_dim=16, vector_noise=0.1).eval()
    gh, gw = (h - patch) // stride + 1, (w - patch) // stride + 1
    assert model.grid_size == (gh, gw) and model.num_patches == gh * gw
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        _, want = clip_reid_forward(dict(model.state_dict()), x, stride=stride, heads=heads)
        got = model(x)
    assert got.shape == (2, 1 + gh * gw, 16)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    rt.check_backbone(model)


def test_attributes():
    model = ClipVisual(img_size=(256, 128), stride_size=12, width=64, layers=1, heads=4, output_dim=32,
                       camera_num=6)
    assert model.grid_size == (21, 10) and model.num_patches == 210
    assert model.positional_embedding.shape == (211, 64)
    assert model.conv1.bias is None and model.conv1.stride == (12, 12) and model.conv1.kernel_size == (16, 16)
    assert (model.width, model.embed_dim, model.out_dim, model.output_dim) == (64, 64, 32, 32)
    assert (model.img_size, model.patch_size, model.stride_size) == ((256, 128), (16, 16), (12, 12))
    assert (model.camera_num, model.view_num, model.sie_coef, model.in_chans) == (6, 0, 1.0, 3)


def test_initialisation_scales():
    torch.manual_seed(0)
    model = ClipVisual(width=256, layers=1, heads=4, output_dim=128, camera_num=50)
    s = 256 ** -0.5
    assert abs(model.positional_embedding.std().item() - s) < 0.05 * s
    assert abs(model.proj.std().item() - s) < 0.05 * s
    # the blocks' scales: test_planted_faults.py::test_clip_initialisation_scales
    # CLIP-ReID's trunc_normal_(cv_embed, std=.02) truncates at +-2 (absolute): a plain normal in effect.
    assert abs(model.cv_embed.std().item() - 0.02) < 0.001 and model.cv_embed.abs().max() < 2
