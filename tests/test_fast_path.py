"""The CPU inference fast path (oneDNN fused linear layers in the blocks and the dense neck): same outputs
as the module path, and only taken where it is safe (no autograd, eval mode, fp32 CPU, no hooks, no
autocast, not while tracing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reid_ms.backbones._fast as fast
from reid_ms import ClipVisual, MultiScaleSlidingWindow, VitTrans

TINY_VIT = dict(img_size=(64, 32), embed_dim=64, depth=2, num_heads=4, camera_num=3, view_num=2)
TINY_CLIP = dict(img_size=(64, 32), width=64, layers=2, heads=4, output_dim=32, camera_num=3, view_num=2)
FUSED_OP = "mkldnn::_linear_pointwise"


def _build(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = (TINY_VIT if kind == "vit" else TINY_CLIP) | overrides
    model = VitTrans(**cfg) if kind == "vit" else ClipVisual(**cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced scale or bias shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def _labels(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return dict(cam_label=torch.randint(0, 3, (batch,), generator=gen),
                view_label=torch.randint(0, 2, (batch,), generator=gen))


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _both_paths(model: torch.nn.Module, images: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        model.set_fused_inference(False)
        module_path = model(images, **kw)
        model.set_fused_inference(True)
        fused = model(images, **kw)
    return fused, module_path


@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize("stride", [16, 12])
def test_fused_equals_module_path(kind, stride):
    # the module path is timm's Block (ViT) and the QuickGELU block (CLIP): they are the oracle
    model = _build(kind, stride_size=stride)
    images = torch.randn(3, 3, 64, 32) * 2
    fused, module_path = _both_paths(model, images, **_labels(3))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fused, _both_paths(model, images.flip(0), **_labels(3))[0])


def test_fused_clip_unprojected_and_large_activations():
    # QuickGELU through oneDNN's swish on 1.702-scaled inputs: also where sigmoid saturates either way
    model = _build("clip")
    with torch.no_grad():
        for block in model.transformer.resblocks:
            block.mlp.c_fc.weight.mul_(40)
    images = torch.randn(2, 3, 64, 32)
    fused, module_path = _both_paths(model, images, project=False, **_labels(2))
    assert fused.shape == (2, 9, 64)
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_fused_path_runs_in_inference_only(kind):
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = _labels(2)
    with torch.inference_mode():
        assert FUSED_OP in _ops(lambda: model(images, **labels))
    with torch.no_grad():
        assert FUSED_OP in _ops(lambda: model(images, **labels))
        model.set_fused_inference(False)
        assert FUSED_OP not in _ops(lambda: model(images, **labels))
        model.set_fused_inference(True)
        model.train()  # dropout / drop path must act: the module path
        assert FUSED_OP not in _ops(lambda: model(images, **labels))
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert FUSED_OP not in _ops(lambda: model(images, **labels))
    # autograd on (a training step, or gradients w.r.t. the input for attribution): module path
    assert FUSED_OP not in _ops(lambda: model(images, **labels))
    model.double()
    with torch.inference_mode():
        assert FUSED_OP not in _ops(lambda: model(images.double(), **labels))


@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize(("max_tokens", "explicit"), [(9, True), (8, False)])
def test_attention_either_side_of_the_token_threshold(kind, max_tokens, explicit, monkeypatch):
    # 9 tokens (64x32, stride 16): explicit image-by-image attention up to the threshold, SDPA above it
    monkeypatch.setattr(fast, "EXPLICIT_ATTENTION_MAX_TOKENS", max_tokens)
    model = _build(kind)
    images = torch.randn(5, 3, 64, 32) * 2
    with torch.inference_mode():
        ops = _ops(lambda: model(images, **_labels(5)))
    assert ("aten::baddbmm" in ops) is explicit
    assert any("scaled_dot_product" in op for op in ops) is not explicit
    fused, module_path = _both_paths(model, images, **_labels(5))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    # every image attends over its own tokens only: permuting the batch permutes the outputs
    flipped, _ = _both_paths(model, images.flip(0), **{k: v.flip(0) for k, v in _labels(5).items()})
    torch.testing.assert_close(flipped, fused.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_forward_hooks_on_blocks_keep_firing(kind):
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    layer = model.blocks[1].mlp.fc1 if kind == "vit" else model.transformer.resblocks[1].mlp.c_fc
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        hooked = model(images, **_labels(2))
    handle.remove()
    assert seen == [torch.Size([2, 9, 256])]
    with torch.inference_mode():
        torch.testing.assert_close(model(images, **_labels(2)), hooked, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_new_weights_are_used_without_stale_copies(kind):
    # no prepacked weight cache: a load or an in-place update after a fused call takes effect at once
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    with torch.inference_mode():
        before = model(images, **_labels(2))
    other = _build(kind)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())
    fused, module_path = _both_paths(model, images, **_labels(2))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    assert (fused - before).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_traced_graphs_hold_no_fused_ops(kind):
    # compile / export / jit.trace see the module path (their backends do their own fusion)
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = _labels(2)
    with torch.no_grad():
        exported = torch.export.export(model, (images,), labels)
        traced = torch.jit.trace(_build(kind, camera_num=0, view_num=0), images, check_trace=False)
        reference = model(images, **labels)
        torch.testing.assert_close(exported.module()(images, **labels), reference, atol=1e-5, rtol=1e-5)
    assert "mkldnn._linear_pointwise" not in str(exported.graph)
    assert "_linear_pointwise" not in str(traced.inlined_graph)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images, **labels), reference, atol=1e-5, rtol=1e-5)
    assert graphs and not any("_linear_pointwise" in g for g in graphs)


@pytest.mark.full
@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize("stride", [16, 12])  # 129 tokens: explicit attention; 211: SDPA
def test_full_size_fused_equals_module_path(kind, stride):
    torch.manual_seed(0)
    model = (VitTrans(stride_size=stride) if kind == "vit" else ClipVisual(stride_size=stride)).eval()
    images = torch.randn(2, 3, 256, 128)
    fused, module_path = _both_paths(model, images)
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)


def test_dense_neck_inference_equals_the_convolution():
    # the dense windows through oneDNN (inference) against the convolutional definition in float64
    torch.manual_seed(0)
    neck = MultiScaleSlidingWindow(16, scales=(2, 3, 8), mode="dense")
    for p in neck.parameters():
        torch.nn.init.normal_(p, std=0.1)
    h, w = 5, 4
    tokens = torch.randn(3, 1 + h * w, 16)
    with torch.inference_mode():
        assert FUSED_OP in _ops(lambda: neck(tokens, (h, w)))
        out = neck(tokens, (h, w))
    grid = tokens[:, 1:].double().transpose(1, 2).reshape(3, 16, h, w)
    context = 0
    for window, s in zip(neck.windows, neck.scales):
        padded = F.pad(grid, (0, -w % s, 0, -h % s))
        context = context + F.conv2d(padded, window.weight.double(), window.bias.double(), stride=s).mean((2, 3))
    expected = tokens[:, 0].double() + context / 3
    torch.testing.assert_close(out[:, 0].double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], tokens[:, 1:], atol=0, rtol=0)
