"""VitTrans: grid arithmetic, TransReID's SIE rule, parity with timm's ViT, gradients, checkpointing, compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import set_fused_attn
from timm.models.vision_transformer import VisionTransformer

import reid_ms
from reid_ms import ConfigError, InputError, VitTrans
from _helpers_vit import bilinear_grid, timm_vit, transreid_forward


def tiny(**kw) -> VitTrans:
    args = dict(img_size=(64, 32), embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.0)
    args.update(kw)
    torch.manual_seed(args.pop("seed", 0))
    return VitTrans(**args)


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


@settings(derandomize=True, deadline=None, max_examples=15)
@given(h=st.integers(16, 80), w=st.integers(16, 80), patch=st.sampled_from([8, 16]), stride=st.integers(4, 16))
def test_grid_matches_the_convolution(h, w, patch, stride):
    model = VitTrans(img_size=(h, w), patch_size=patch, stride_size=stride, embed_dim=8, depth=1, num_heads=2)
    conv_out = model.patch_embed.proj(torch.zeros(1, 3, h, w)).shape[-2:]
    assert model.grid_size == tuple(conv_out) == ((h - patch) // stride + 1, (w - patch) // stride + 1)
    assert model(torch.randn(1, 3, h, w)).shape[1] == 1 + conv_out[0] * conv_out[1]


def test_tokens_are_row_major():
    """Token 1 + r*W + c is the patch at row r, column c: the conv output flattened row by row."""
    model = tiny(depth=1).eval()
    images = torch.randn(2, 3, 64, 32)
    conv = model.patch_embed.proj(images)  # [B, D, H, W]
    tokens = model.patch_embed(images)
    h, w = model.grid_size
    for r, c in ((0, 1), (2, 0), (h - 1, w - 1)):
        torch.testing.assert_close(tokens[:, r * w + c], conv[:, :, r, c])


CAMERA_VIEW = [(0, 0), (4, 0), (0, 3), (4, 3)]


@pytest.mark.parametrize("camera_num, view_num", CAMERA_VIEW)
def test_matches_transreid_forward_written_out(camera_num, view_num):
    model = tiny(stride_size=12, camera_num=camera_num, view_num=view_num).eval()
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


def test_sie_vector_added_to_every_token():
    model = tiny(camera_num=3, view_num=2, sie_coef=2.5).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        a = model.embed(images, cam_label=torch.tensor([0, 1]), view_label=torch.tensor([1, 0]))
        b = model.embed(images, cam_label=torch.tensor([2, 1]), view_label=torch.tensor([0, 1]))
    sie = model.sie_embed[:, 0]
    # rows: (0, 1) -> 1, (2, 0) -> 4 for image 0; (1, 0) -> 2, (1, 1) -> 3 for image 1
    diff = (a - b).transpose(0, 1)  # [T, B, D]
    torch.testing.assert_close(diff, (2.5 * (sie[[1, 2]] - sie[[4, 3]])).expand_as(diff), atol=1e-6, rtol=0)


@pytest.mark.parametrize("camera_num, view_num", CAMERA_VIEW[1:])
def test_labels_as_int_list_and_tensor_agree(camera_num, view_num):
    model = tiny(camera_num=camera_num, view_num=view_num).eval()
    images = torch.randn(2, 3, 64, 32)
    kw_int = dict(cam_label=1 if camera_num else None, view_label=2 if view_num else None)
    kw_t = {k: torch.tensor([v, v]) if v is not None else None for k, v in kw_int.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(images, **kw_int), model(images, **kw_t), atol=0, rtol=0)


def test_matches_timm_vit_with_resized_position_table():
    """Same weights in timm's VisionTransformer (built at 64x32) and VitTrans give the same tokens."""
    ref = timm_vit(img_size=(64, 64))
    state = ref.state_dict()
    model = tiny(embed_dim=32)
    model.load_state_dict(dict(state, pos_embed=bilinear_grid(state["pos_embed"], (4, 4), (4, 2))))
    model.eval()
    oracle = timm_vit(img_size=(64, 32))
    oracle.load_state_dict(dict(state, pos_embed=bilinear_grid(state["pos_embed"], (4, 4), (4, 2))))
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), oracle.forward_features(images), atol=1e-5, rtol=1e-5)


def test_parameter_names_are_timms():
    model = tiny(camera_num=2)
    ref = timm_vit(img_size=(64, 32))
    assert set(model.state_dict()) == set(ref.state_dict()) | {"sie_embed"}
    assert model.sie_embed.shape == (2, 1, 32)
    assert "sie_embed" not in tiny().state_dict()


@pytest.mark.parametrize("camera_num, view_num", CAMERA_VIEW)
def test_gradient_reaches_every_parameter(camera_num, view_num):
    model = tiny(camera_num=camera_num, view_num=view_num).train()
    kw = dict(cam_label=torch.tensor([0, 1]) if camera_num else None,
              view_label=torch.tensor([1, 2]) if view_num else None)
    model(torch.randn(2, 3, 64, 32), **kw).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_outputs_and_grads():
    model = tiny(camera_num=3).train()
    images = torch.randn(2, 3, 64, 32)
    cams = torch.tensor([2, 0])
    out = model(images, cam_label=cams)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(images, cam_label=cams)
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out, atol=0, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-7, rtol=1e-5, msg=n)


def test_forward_blocks_can_stop_before_the_last_block():
    model = tiny(depth=3).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        x = model.embed(images)
        partial_run = model.forward_blocks(x, end=-1)
        by_hand = model.blocks[1](model.blocks[0](x))
        # forward_blocks takes the fused CPU path, the blocks called by hand the module path: float rounding
        torch.testing.assert_close(partial_run, by_hand, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.norm(model.blocks[2](partial_run)), model(images), atol=1e-5, rtol=1e-5)


def test_fused_attention_even_when_timm_default_is_off():
    # timm's unfused attention materialises [B, heads, T, T] through softmax: the blocks never take it
    set_fused_attn(False)
    try:
        model = tiny().eval()
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


def test_no_weight_decay_names_parameters():
    model = tiny(camera_num=2)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "sie_embed"}
    assert all(n in names for n in model.no_weight_decay())


def test_drop_path_schedule():
    model = VitTrans(img_size=(32, 32), embed_dim=16, depth=4, num_heads=2, drop_path_rate=0.3)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


@pytest.mark.parametrize("kwargs, match", [
    (dict(embed_dim=30, num_heads=4), "not divisible by num_heads"),
    (dict(img_size=(8, 32)), "smaller than patch_size"),
    (dict(img_size=(64, 32, 3)), "img_size"),
    (dict(stride_size=0), "stride_size"),
    (dict(camera_num=-1), "camera_num"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize("images, match", [
    (torch.randn(2, 1, 64, 32), "in_chans=3"),
    (torch.randn(2, 3, 64, 64), "64x32"),
    (torch.randn(3, 64, 32), "unsqueeze"),
    (torch.zeros(2, 3, 64, 32, dtype=torch.uint8), "floating-point"),
])
def test_image_errors(images, match):
    with pytest.raises(InputError, match=match):
        tiny()(images)


@pytest.mark.parametrize("camera_num, view_num, kw, match", [
    (3, 0, dict(), "needs cam_label"),
    (0, 2, dict(cam_label=torch.tensor([0, 1]), view_label=torch.tensor([0, 1])), "camera_num=0"),
    (3, 0, dict(cam_label=torch.tensor([0, 3])), r"\[0, 2\]"),
    (3, 0, dict(cam_label=torch.tensor([-1, 0])), r"\[0, 2\]"),
    (3, 2, dict(cam_label=torch.tensor([0, 1]), view_label=torch.tensor([0, 2])), "view_num=2"),
    (3, 0, dict(cam_label=torch.tensor([0.0, 1.0])), "integer"),
    (3, 0, dict(cam_label=torch.tensor([0, 1, 2])), "one label per image"),
])
def test_label_errors(camera_num, view_num, kw, match):
    with pytest.raises(InputError, match=match):
        tiny(camera_num=camera_num, view_num=view_num)(torch.randn(2, 3, 64, 32), **kw)


def test_compile_fullgraph_without_graph_breaks():
    """The checks run under dynamo without a graph break (the eager backend only traces)."""
    model = tiny(camera_num=3, view_num=2).eval()
    images, cams, views = torch.randn(2, 3, 64, 32), torch.tensor([2, 0]), torch.tensor([1, 1])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        # the trace holds the module path, eager runs the fused CPU path: equal up to float rounding
        torch.testing.assert_close(compiled(images, cam_label=cams, view_label=views),
                                   model(images, cam_label=cams, view_label=views), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.full
def test_compile_fullgraph_inductor():
    model = tiny(camera_num=3, view_num=2).eval()
    images, cams, views = torch.randn(2, 3, 64, 32), torch.tensor([2, 0]), torch.tensor([1, 1])
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images, cam_label=cams, view_label=views),
                                   model(images, cam_label=cams, view_label=views), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


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
