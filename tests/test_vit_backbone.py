"""VitTrans: grid arithmetic, TransReID's SIE rule, parity with timm's ViT (what both backbones share, gradients,
labels and errors among it: test_backbones.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from timm.layers import set_fused_attn
from timm.models.vision_transformer import VisionTransformer

import reid_ms
from reid_ms import VitTrans
from reid_ms import testing as rt
from _helpers_vit import bilinear_grid, timm_vit, transreid_forward


@pytest.mark.parametrize("img_size, stride, grid", [
    ((256, 128), 16, (16, 8)), ((256, 128), 12, (21, 10)), ((384, 128), 16, (24, 8)), ((384, 128), 12, (31, 10)),
])
def test_shapes_for_reid_sizes(img_size, stride, grid):
    model = VitTrans(img_size=img_size, stride_size=stride, embed_dim=16, depth=1, num_heads=2).eval()
    tokens = model(torch.randn(2, 3, *img_size))
    assert model.grid_size == grid
    assert model.num_patches == grid[0] * grid[1]
    assert tokens.shape == (2, 1 + grid[0] * grid[1], 16)
    assert model.pos_embed.shape == (1, 1 + grid[0] * grid[1], 16)
    assert model.out_dim == model.embed_dim == 16
    assert torch.isfinite(tokens).all()


@settings(derandomize=True, deadline=None, max_examples=6)
@given(geo=rt.geometries(max_side=80, patch_sizes=(8, 16), max_tokens=65), table=rt.label_tables(3, 2))
def test_grid_matches_the_convolution(geo, table):
    (h, w), patch, stride = geo
    model = VitTrans(img_size=(h, w), patch_size=patch, stride_size=stride, embed_dim=8, depth=1, num_heads=2,
                     camera_num=table[0], view_num=table[1])
    conv_out = model.patch_embed.proj(torch.zeros(1, 3, h, w)).shape[-2:]
    assert model.grid_size == tuple(conv_out) == ((h - patch) // stride + 1, (w - patch) // stride + 1)
    rt.check_backbone(model)


def test_tokens_are_row_major(tiny):
    """Token 1 + r*W + c is the patch at row r, column c: the conv output flattened row by row."""
    model = tiny.backbone("vit", blocks=1).eval()
    images = torch.randn(2, 3, 64, 32)
    conv = model.patch_embed.proj(images)  # [B, D, H, W]
    tokens = model.patch_embed(images)
    h, w = model.grid_size
    for r, c in ((0, 1), (2, 0), (h - 1, w - 1)):
        torch.testing.assert_close(tokens[:, r * w + c], conv[:, :, r, c])


CAMERA_VIEW = [(0, 0), (4, 0), (0, 3), (4, 3)]


@pytest.mark.parametrize("camera_num, view_num", CAMERA_VIEW)
def test_matches_transreid_forward_written_out(camera_num, view_num, tiny):
    model = tiny.backbone("vit", stride_size=12, camera_num=camera_num, view_num=view_num).eval()
    images = torch.randn(3, 3, 64, 32)
    cams = torch.tensor([0, 3, 1]) if camera_num else None
    views = torch.tensor([2, 0, 1]) if view_num else None
    if camera_num and view_num:
        row = cams * view_num + views
    else:
        row = cams if camera_num else views
    expected = transreid_forward(model.state_dict(), images, 12, row, 3.0, num_heads=4)
    with torch.no_grad():
        got = model(images, cam_label=cams, view_label=views)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sie_vector_added_to_every_token(tiny):
    model = tiny.backbone("vit", camera_num=3, view_num=2, sie_coef=2.5).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        a = model.embed(images, cam_label=torch.tensor([0, 1]), view_label=torch.tensor([1, 0]))
        b = model.embed(images, cam_label=torch.tensor([2, 1]), view_label=torch.tensor([0, 1]))
    sie = model.sie_embed[:, 0]
    # rows: (0, 1) -> 1, (2, 0) -> 4 for image 0; (1, 0) -> 2, (1, 1) -> 3 for image 1
    diff = (a - b).transpose(0, 1)  # [T, B, D]
    torch.testing.assert_close(diff, (2.5 * (sie[[1, 2]] - sie[[4, 3]])).expand_as(diff), atol=1e-6, rtol=0)


def test_matches_timm_vit_with_resized_position_table(tiny):
    """Same weights in timm's VisionTransformer (built at 64x32) and VitTrans give the same tokens."""
    ref = timm_vit(img_size=(64, 64))
    state = ref.state_dict()
    model = tiny.backbone("vit", stride_size=16)  # a 4 x 2 grid, timm's at 64x32
    model.load_state_dict(dict(state, pos_embed=bilinear_grid(state["pos_embed"], (4, 4), (4, 2))))
    model.eval()
    oracle = timm_vit(img_size=(64, 32))
    oracle.load_state_dict(dict(state, pos_embed=bilinear_grid(state["pos_embed"], (4, 4), (4, 2))))
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), oracle.forward_features(images), atol=1e-5, rtol=1e-5)


def test_parameter_names_are_timms(tiny):
    model = tiny.backbone("vit", camera_num=2)
    ref = timm_vit(img_size=(64, 32))
    assert set(model.state_dict()) == set(ref.state_dict()) | {"sie_embed"}
    assert model.sie_embed.shape == (2, 1, 32)


def test_forward_blocks_can_stop_before_the_last_block(tiny):
    model = tiny.backbone("vit", blocks=3).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        x = model.embed(images)
        partial_run = model.forward_blocks(x, end=-1)
        by_hand = model.blocks[1](model.blocks[0](x))
        # forward_blocks takes the fused CPU path, the blocks called by hand the module path: float rounding
        torch.testing.assert_close(partial_run, by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.norm(model.blocks[2](partial_run)), model(images), atol=1e-5, rtol=1e-5)


def test_fused_attention_even_when_timm_default_is_off(tiny):
    # timm's unfused attention materialises [B, heads, T, T] through softmax: the blocks never take it
    set_fused_attn(False)
    try:
        model = tiny.backbone("vit").eval()
        model.set_fused_inference(False)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(torch.randn(2, 3, 64, 32))
    finally:
        set_fused_attn(True)
    ops = {e.key for e in prof.key_averages()}
    assert any("scaled_dot_product" in op for op in ops) and "aten::softmax" not in ops


def test_transreid_initialisation():
    model = VitTrans(img_size=(64, 32), embed_dim=64, depth=2, num_heads=4)
    conv = model.patch_embed.proj.weight
    assert conv.std().item() == pytest.approx(math.sqrt(2.0 / (16 * 16 * 64)), rel=0.05)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0), name
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.15), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.2)


def test_drop_path_schedule():
    model = VitTrans(img_size=(32, 32), embed_dim=16, depth=4, num_heads=2, drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_exported_from_package():
    assert reid_ms.VitTrans is VitTrans
    assert reid_ms.backbones.VitTrans is VitTrans


def test_default_is_vit_b16():
    with torch.device("meta"):  # structure only: no memory, no initialisation to pay for
        model = VitTrans()
        ref = VisionTransformer(img_size=(256, 128), num_classes=0)
    assert model.grid_size == (16, 8) and model.embed_dim == 768 and len(model.blocks) == 12
    assert model.blocks[0].attn.num_heads == 12 and model.blocks[0].mlp.fc1.out_features == 3072
    assert model.norm.eps == 1e-6 and model.sie_coef == 3.0
    act = model.blocks[0].mlp.act
    assert isinstance(act, torch.nn.GELU) and act.approximate == "none"
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
