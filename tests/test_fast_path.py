"""The CPU inference fast path (packed-weight MKL products, or oneDNN fused ones, in the blocks; oneDNN in
the dense neck): same outputs as the module path, only taken where it is safe (no autograd, eval mode,
fp32 CPU, no hooks, no autocast, not while tracing), and never working from stale packed weights."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import reid_ms.backbones._fast as fast
from _helpers_backbones import tiny_backbone, tiny_labels
from reid_ms import ClipVisual, MultiScaleSlidingWindow, VitTrans

FUSED_OP = "mkldnn::_linear_pointwise"  # oneDNN's product with a fused epilogue
PACKED_OP = "mkl::_mkl_linear"  # MKL's product with a packed weight
FAST_OPS = {FUSED_OP, PACKED_OP}


@pytest.fixture(params=["mkl", "onednn"])
def kernels(request, monkeypatch) -> str:
    """Run the test with each of the fused path's two kernel sets; returns the op the blocks should use."""
    if request.param == "mkl" and not fast.mkl_packing_available():
        pytest.skip("this PyTorch build has no MKL packed kernels (non-x86)")
    monkeypatch.setattr(fast, "USE_MKL_PACKING", request.param == "mkl")
    return PACKED_OP if request.param == "mkl" else FUSED_OP


def _build(kind: str, **overrides) -> torch.nn.Module:
    return tiny_backbone(kind, 0.5, **overrides)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _both_paths(model: torch.nn.Module, images: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused path's output (from whatever packed copies the model holds), then the module path's."""
    with torch.inference_mode():
        fused = model(images, **kw)
        model.set_fused_inference(False)
        module_path = model(images, **kw)
        model.set_fused_inference(True)
    return fused, module_path


@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize("stride", [16, 12])
def test_fused_equals_module_path(kind, stride, kernels):
    # the module path is timm's Block (ViT) and the QuickGELU block (CLIP): they are the oracle
    model = _build(kind, stride_size=stride)
    images = torch.randn(3, 3, 64, 32) * 2
    fused, module_path = _both_paths(model, images, **tiny_labels(3))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fused, _both_paths(model, images.flip(0), **tiny_labels(3))[0])


def test_fused_clip_unprojected_and_large_activations(kernels):
    # QuickGELU as swish on 1.702-scaled inputs: also where sigmoid saturates either way
    model = _build("clip")
    with torch.no_grad():
        for block in model.transformer.resblocks:
            block.mlp.c_fc.weight.mul_(40)
    images = torch.randn(2, 3, 64, 32)
    fused, module_path = _both_paths(model, images, project=False, **tiny_labels(2))
    assert fused.shape == (2, 9, 64)
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_fused_path_runs_in_inference_only(kind, kernels):
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny_labels(2)

    def fast_ops() -> set[str]:
        return _ops(lambda: model(images, **labels)) & FAST_OPS

    with torch.inference_mode():
        assert fast_ops() == {kernels}
    with torch.no_grad():
        assert fast_ops() == {kernels}
        model.set_fused_inference(False)
        assert not fast_ops()
        model.set_fused_inference(True)
        model.train()  # dropout / drop path must act: the module path
        assert not fast_ops()
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast_ops()
    # autograd on (a training step, or gradients w.r.t. the input for attribution): module path
    assert not fast_ops()
    model.double()
    with torch.inference_mode():
        assert not _ops(lambda: model(images.double(), **labels)) & FAST_OPS


@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize(("max_tokens", "explicit"), [(9, True), (8, False)])
def test_attention_either_side_of_the_token_threshold(kind, max_tokens, explicit, monkeypatch, kernels, two_threads):
    # 9 tokens (64x32, stride 16): explicit image-by-image attention up to the threshold, SDPA above it
    monkeypatch.setattr(fast, "EXPLICIT_ATTENTION_MAX_TOKENS", max_tokens)
    model = _build(kind)
    images = torch.randn(5, 3, 64, 32) * 2
    with torch.inference_mode():
        ops = _ops(lambda: model(images, **tiny_labels(5)))
    assert ("aten::baddbmm" in ops) is explicit
    assert any("scaled_dot_product" in op for op in ops) is not explicit
    fused, module_path = _both_paths(model, images, **tiny_labels(5))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    torch.set_num_threads(1)  # a thread count outside the per-image range: SDPA at any length
    with torch.inference_mode():
        ops = _ops(lambda: model(images, **tiny_labels(5)))
    assert "aten::baddbmm" not in ops and any("scaled_dot_product" in op for op in ops)
    # every image attends over its own tokens only: permuting the batch permutes the outputs
    flipped, _ = _both_paths(model, images.flip(0), **{k: v.flip(0) for k, v in tiny_labels(5).items()})
    torch.testing.assert_close(flipped, fused.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_forward_hooks_on_blocks_keep_firing(kind):
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    layer = model.blocks[1].mlp.fc1 if kind == "vit" else model.transformer.resblocks[1].mlp.c_fc
    seen = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        hooked = model(images, **tiny_labels(2))
    handle.remove()
    assert seen == [torch.Size([2, 9, 256])]
    with torch.inference_mode():
        torch.testing.assert_close(model(images, **tiny_labels(2)), hooked, atol=1e-5, rtol=1e-5)


def _packs(model: torch.nn.Module) -> fast.PackedWeights:
    return model.packed_weights if isinstance(model, VitTrans) else model.transformer.packed_weights


def _block_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if p.dim() == 2 and ("blocks" in name)]


@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize("update", ["load_state_dict", "optimizer", "no_grad_mul", "data_assignment", "to"])
def test_new_weights_are_used_not_stale_packed_copies(kind, update, kernels):
    # a weight changed after an inference call takes effect in the next one, however it was changed
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32) * 2
    with torch.inference_mode():
        before = model(images, **tiny_labels(2))
    if kernels == PACKED_OP:
        assert len(_packs(model)) == 4 * 2  # qkv, proj, fc1, fc2 in 2 blocks
    other = _build(kind)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    if update == "load_state_dict":
        model.load_state_dict(other.state_dict())
    elif update == "optimizer":  # an in-place step in train mode, back to eval without calling train()
        opt = torch.optim.SGD(model.parameters(), lr=10.0)
        model(images, **tiny_labels(2)).square().mean().backward()
        opt.step()
    elif update == "no_grad_mul":
        with torch.no_grad():
            for w in _block_weights(model):
                w.mul_(1.5)
    elif update == "data_assignment":  # new storage: a different data pointer
        for w in _block_weights(model):
            w.data = w.data * 1.5
    else:
        model.double().float()
    fused, module_path = _both_paths(model, images, **tiny_labels(2))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    if update != "to":
        assert (fused - before).abs().max() > 1e-2


@pytest.mark.skipif(not fast.mkl_packing_available(), reason="packed copies exist only with MKL's kernels")
@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_packed_copies_are_freed_and_never_saved(kind):
    model = _build(kind, camera_num=0, view_num=0)
    images = torch.randn(2, 3, 64, 32)

    def fill() -> None:
        with torch.inference_mode():
            model(images)
        assert len(_packs(model)) == 8

    fill()
    keys = set(model.state_dict())
    for duplicate in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert len(_packs(duplicate)) == 0
        with torch.inference_mode():  # and the duplicate's cache works on its own weights
            torch.testing.assert_close(duplicate(images), model(images), atol=0, rtol=0)
        assert len(_packs(duplicate)) == 8
    buffer = io.BytesIO()
    torch.save(model, buffer)
    assert len(_packs(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))) == 0
    assert set(model.state_dict()) == keys  # not in the state dict either
    model.train()
    assert len(_packs(model)) == 0
    model.eval()
    fill()
    model.set_fused_inference(True)  # the documented way to drop copies after a write through .data
    assert len(_packs(model)) == 0
    fill()
    model.set_fused_inference(False)
    assert len(_packs(model)) == 0
    with torch.inference_mode():
        model(images)
    assert len(_packs(model)) == 0


@pytest.mark.skipif(not fast.mkl_packing_available(), reason="packed copies exist only with MKL's kernels")
def test_copies_of_replaced_layers_are_dropped():
    # replaced layers' weights die; their packed copies go at the next packing, not at train() only
    model = _build("vit", camera_num=0, view_num=0)
    images = torch.randn(2, 3, 64, 32)
    with torch.inference_mode():
        model(images)
    assert len(_packs(model)) == 8
    block = model.blocks[1]
    block.mlp.fc1 = torch.nn.Linear(64, 256)
    block.mlp.fc2 = torch.nn.Linear(256, 64)
    with torch.inference_mode():
        fused = model(images)
    assert len(_packs(model)) == 8
    model.set_fused_inference(False)
    with torch.inference_mode():
        torch.testing.assert_close(fused, model(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_large_batches_run_in_chunks_of_whole_images(kind, kernels, monkeypatch):
    # 9 tokens per image, at most 20 rows a chunk: 11 images, ceil(99 / 20) = 5 chunks wanted, so
    # ceil(11 / 5) = 3 images a chunk: 3, 3, 3, 2, each through both blocks before the next chunk starts
    monkeypatch.setattr(fast, "CHUNK_ROWS", 20)
    model = _build(kind)
    images = torch.randn(11, 3, 64, 32) * 2
    labels = tiny_labels(11)
    calls = []
    original = fast.attention
    monkeypatch.setattr(fast, "attention", lambda q, k, v: calls.append(q.shape[0]) or original(q, k, v))
    fused, module_path = _both_paths(model, images, **labels)
    assert calls == [3, 3, 3, 3, 3, 3, 2, 2]
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    if kernels == PACKED_OP:
        assert _packs(model).rows == 3 * 9  # full chunks keep their packed copies; the last one packs aside
    # each image's features do not depend on the chunk it ran in
    with torch.inference_mode():
        alone = model(images[-1:], cam_label=labels["cam_label"][-1:], view_label=labels["view_label"][-1:])
    torch.testing.assert_close(alone, fused[-1:], atol=1e-5, rtol=1e-5)


def test_weights_made_in_inference_mode_pack_every_call(kernels):
    # inference tensors have no version counter: nothing is cached, the results stay right
    with torch.inference_mode():
        model = _build("vit", camera_num=0, view_num=0)
        images = torch.randn(2, 3, 64, 32)
        first = model(images)
        for w in _block_weights(model):
            w.mul_(2.0)
        second = model(images)
    assert len(_packs(model)) == 0
    model.set_fused_inference(False)
    with torch.inference_mode():
        torch.testing.assert_close(second, model(images), atol=1e-5, rtol=1e-5)
    assert (second - first).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_traced_graphs_hold_no_fused_ops(kind):
    # export / jit.trace see the module path: portable graphs of aten ops
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny_labels(2)
    with torch.no_grad():
        exported = torch.export.export(model, (images,), labels)
        traced = torch.jit.trace(_build(kind, camera_num=0, view_num=0), images, check_trace=False)
        reference = model(images, **labels)
        torch.testing.assert_close(exported.module()(images, **labels), reference, atol=1e-5, rtol=1e-5)
    for graph in (str(exported.graph), str(traced.inlined_graph)):
        assert "_linear_pointwise" not in graph and "_mkl_linear" not in graph and "fused_blocks" not in graph


def _compiled_graphs(model: torch.nn.Module, run) -> list[str]:
    """The graphs dynamo hands to the backend (fullgraph: a graph break fails) while ``run(compiled)``."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    run(torch.compile(model, fullgraph=True, backend=backend))
    torch._dynamo.reset()
    return graphs


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_compiled_inference_calls_the_fused_path_as_one_op(kind, kernels):
    model = _build(kind)
    images = torch.randn(5, 3, 64, 32) * 2
    labels = tiny_labels(5)
    fused, module_path = _both_paths(model, images, **labels)
    results = []

    def infer(compiled):
        with torch.inference_mode():
            results.append(compiled(images, **labels))

    graphs = _compiled_graphs(model, infer)
    assert len(graphs) == 1 and graphs[0].count("reid_ms.fused_blocks") == 1
    torch.testing.assert_close(results[0], fused, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0], module_path, atol=1e-5, rtol=1e-5)
    if kernels == PACKED_OP:  # compiled and eager calls share the model's packed copies
        assert len(_packs(model)) == 8
        model.train()
        assert len(_packs(model)) == 0
        model.eval()


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_compiled_training_hooks_and_autocast_keep_the_module_path(kind):
    model = _build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny_labels(2)

    def train_step(compiled):
        compiled(images, **labels).square().mean().backward()

    def autocast_inference(compiled):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(images, **labels)

    def input_gradient(compiled):  # eval mode with autograd on (attribution): the module path has derivatives
        compiled(images.clone().requires_grad_(True), **labels).sum().backward()

    graphs = _compiled_graphs(model.train(), train_step) + _compiled_graphs(model.eval(), autocast_inference)
    graphs += _compiled_graphs(model, input_gradient)
    layer = model.blocks[0].mlp.fc1 if kind == "vit" else model.transformer.resblocks[0].mlp.c_fc
    handle = layer.register_forward_hook(lambda m, i, o: None)
    graphs += _compiled_graphs(model, lambda compiled: compiled(images, **labels))
    handle.remove()
    assert len(graphs) == 4 and not any("fused_blocks" in g for g in graphs)


def test_fused_blocks_op_registration():
    # schema, fake (shape) implementation and eager kernel agree: torch.library's own consistency check
    import reid_ms.backbones._compiled as compiled_path

    model = _build("vit", camera_num=0, view_num=0)
    tokens = torch.randn(3, 9, 64)
    layers = [(b.norm1, b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj, b.norm2, b.mlp.fc1, b.mlp.fc2)
              for b in model.blocks]
    params = [t for layer in layers for t in (layer[0].weight, layer[0].bias, layer[1], layer[2], layer[3].weight,
                                              layer[3].bias, layer[4].weight, layer[4].bias, layer[5].weight,
                                              layer[5].bias, layer[6].weight, layer[6].bias)]
    # inference only (no autograd formula): the check runs on tensors that need no gradient
    args = (tokens, [p.detach() for p in params], 4, 1e-6, "gelu", model.packed_weights.token)
    torch.library.opcheck(torch.ops.reid_ms.fused_blocks.default, args)
    with torch.inference_mode():
        torch.testing.assert_close(compiled_path.run_blocks(tokens, layers, 4, "gelu", model.packed_weights),
                                   model.forward_blocks(tokens), atol=1e-6, rtol=1e-6)


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


def test_empty_token_batch_through_the_blocks(kernels):
    # forward() refuses an empty batch; forward_blocks() on tokens passes it through like the module path
    model = _build("vit")
    with torch.inference_mode():
        assert model.forward_blocks(torch.randn(0, 9, 64)).shape == (0, 9, 64)
