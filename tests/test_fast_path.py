"""The CPU inference fast path and who decides it.

- The fused path (oneDNN's products with fused epilogues, or MKL's packed products inside a model made by
  ``optimize_for_inference``) gives the module path's outputs, and is taken only where it is safe (no
  autograd, eval mode, fp32 CPU, no hooks, no autocast, oneDNN on, not while exporting or tracing).
- A trainable model keeps no derived copy of its weights: after any weight change, by any route, the next
  inference uses the current weights.
- ``optimize_for_inference`` returns a frozen snapshot that refuses training and weight changes.
- One function (``reid_ms.dispatch.block_path``) decides for eager and compiled calls, for both backbones,
  and ``reid_ms.explain_path`` reports what it decided and why.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import reid_ms.backbones._common as common
import reid_ms.dispatch as dispatch
import reid_ms.kernels.blocks as blocks
from reid_ms import ClipVisual, InferenceModelError, MultiScaleSlidingWindow, VitTrans, explain_path
from reid_ms import optimize_for_inference
from reid_ms.kernels.blocks import BlockParams

FUSED_OP = "mkldnn::_linear_pointwise"  # oneDNN's product with a fused epilogue
PACKED_OP = "mkl::_mkl_linear"  # MKL's product with a packed weight
FAST_OPS = {FUSED_OP, PACKED_OP}
KINDS = ["vit", "clip"]


@pytest.fixture(params=["model", "frozen"])
def runner(request) -> str:
    """Run the test through the trainable model's fused path and through an ``optimize_for_inference`` copy."""
    if request.param == "frozen" and not dispatch.MKL_PACKING_AVAILABLE:
        pytest.skip("this PyTorch build has no MKL packed kernels (non-x86): the frozen copy runs oneDNN too")
    return request.param


@pytest.fixture
def build(tiny):
    """``build(kind, **overrides)``: a tiny backbone in eval mode, 64 wide at stride 16 (9 tokens at 64x32),
    with camera/view tables (labels: ``tiny.labels``) and noisy norms and biases."""
    return lambda kind, **overrides: tiny.backbone(
        kind, width=64, side_info=True, vector_noise=0.5, **{"stride_size": 16, **overrides}).eval()


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _module_path(model: torch.nn.Module, images: torch.Tensor, **kw) -> torch.Tensor:
    model.set_fused_inference(False)
    try:
        with torch.inference_mode():
            return model(images, **kw)
    finally:
        model.set_fused_inference(True)


def _fused(model: torch.nn.Module, images: torch.Tensor, runner: str = "model", **kw) -> torch.Tensor:
    if runner == "frozen":
        return optimize_for_inference(model)(images, **kw)
    with torch.inference_mode():
        return model(images, **kw)


def _both_paths(model, images, runner="model", **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused path's output, then the module path's (the oracle: timm's Block, CLIP's QuickGELU block)."""
    return _fused(model, images, runner, **kw), _module_path(model, images, **kw)


def _block_layer(model: torch.nn.Module, i: int) -> torch.nn.Module:
    return model.blocks[i].mlp.fc1 if isinstance(model, VitTrans) else model.transformer.resblocks[i].mlp.c_fc


def _block_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for b in model.block_stack() for p in b.parameters() if p.dim() == 2]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride", [16, 12])
def test_fused_equals_module_path(kind, stride, runner, build, tiny):
    model = build(kind, stride_size=stride)
    images = torch.randn(3, 3, 64, 32) * 2
    fused, module_path = _both_paths(model, images, runner, **tiny.labels(3))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    assert not torch.equal(fused, _both_paths(model, images.flip(0), runner, **tiny.labels(3))[0])


def test_fused_clip_unprojected_and_large_activations(runner, build, tiny):
    # QuickGELU as swish on 1.702-scaled inputs: also where sigmoid saturates either way
    model = build("clip")
    with torch.no_grad():
        for block in model.transformer.resblocks:
            block.mlp.c_fc.weight.mul_(40)
    images = torch.randn(2, 3, 64, 32)
    fused, module_path = _both_paths(model, images, runner, project=False, **tiny.labels(2))
    assert fused.shape == (2, 9, 64)
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_path_runs_in_inference_only(kind, build, tiny):
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny.labels(2)

    def fast_ops() -> set[str]:
        return _ops(lambda: model(images, **labels)) & FAST_OPS

    with torch.inference_mode():
        assert fast_ops() == {FUSED_OP}  # the trainable model never packs weights
    with torch.no_grad():
        assert fast_ops() == {FUSED_OP}
        model.set_fused_inference(False)
        assert not fast_ops()
        model.set_fused_inference(True)
        model.train()  # dropout / drop path must act: the module path
        assert not fast_ops()
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fast_ops()
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            assert not fast_ops()
        finally:
            torch.backends.mkldnn.enabled = enabled
    # autograd on (a training step, or gradients w.r.t. the input for attribution): module path
    assert not fast_ops()
    model.double()
    with torch.inference_mode():
        assert not _ops(lambda: model(images.double(), **labels)) & FAST_OPS
    frozen = optimize_for_inference(model.float())
    if dispatch.MKL_PACKING_AVAILABLE:
        assert _ops(lambda: frozen(images, **labels)) & FAST_OPS == {PACKED_OP}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("max_tokens", "explicit"), [(9, True), (8, False)])
def test_attention_either_side_of_the_token_threshold(kind, max_tokens, explicit, monkeypatch, runner, two_threads,
                                                      build, tiny):
    # 9 tokens (64x32, stride 16): explicit image-by-image attention up to the threshold, SDPA above it
    monkeypatch.setattr(dispatch, "EXPLICIT_ATTENTION_MAX_TOKENS", max_tokens)
    model = build(kind)
    images = torch.randn(5, 3, 64, 32) * 2
    ops = _ops(lambda: _fused(model, images, runner, **tiny.labels(5)))
    assert ("aten::baddbmm" in ops) is explicit
    assert any("scaled_dot_product" in op for op in ops) is not explicit
    fused, module_path = _both_paths(model, images, runner, **tiny.labels(5))
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    torch.set_num_threads(1)  # a thread count outside the per-image range: SDPA at any length
    ops = _ops(lambda: _fused(model, images, runner, **tiny.labels(5)))
    assert "aten::baddbmm" not in ops and any("scaled_dot_product" in op for op in ops)
    # every image attends over its own tokens only: permuting the batch permutes the outputs
    flipped = _fused(model, images.flip(0), runner, **{k: v.flip(0) for k, v in tiny.labels(5).items()})
    torch.testing.assert_close(flipped, fused.flip(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_hooks_on_blocks_keep_firing(kind, build, tiny):
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    seen = []
    handle = _block_layer(model, 1).register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        hooked = model(images, **tiny.labels(2))
        assert explain_path(model, images, **tiny.labels(2))[0].blocks == "module"
    handle.remove()
    assert seen[0] == torch.Size([2, 9, 256])
    with torch.inference_mode():
        torch.testing.assert_close(model(images, **tiny.labels(2)), hooked, atol=1e-5, rtol=1e-5)


# ---- inference follows the weights, whatever changed them ----

def _scaled_copy(build, kind: str) -> dict[str, torch.Tensor]:
    other = build(kind)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    return other.state_dict()


def _optimizer_step(model, images, labels, name: str, impl: str, mode: str) -> None:
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    opt = cls(model.parameters(), lr=0.5, **kwargs)
    model.train(mode == "train")
    model(images, **labels).square().mean().backward()
    opt.step()
    model.eval()


OPTIMIZER_ROUTES = [f"optimizer-{n}-{i}-{m}" for n in ("sgd", "adam", "adamw")
                    for i in ("fused", "foreach", "plain") for m in ("train", "eval")]
WRITE_ROUTES = ["data_assignment_x20", "data_inplace", "copy_", "no_grad_mul", "load_state_dict",
                "load_state_dict_assign", "ema"]
CONVERSION_ROUTES = ["double_float", "half_float", "bfloat16_float", "to_cpu", "swap_double_float",
                     "swap_load_state_dict", "swap_load_state_dict_assign"]


def _change_weights(model, build, kind: str, route: str, images, labels) -> None:
    weights = _block_weights(model)
    if route.startswith("optimizer-"):
        _, name, impl, mode = route.split("-")
        _optimizer_step(model, images, labels, name, impl, mode)
    elif route == "data_assignment_x20":  # new storage each time; freed ones may be reused at the same address
        for _ in range(20):
            for w in weights:
                w.data = w.data * 1.02
    elif route == "data_inplace":  # bypasses the version counter
        for w in weights:
            w.data.mul_(1.5)
    elif route == "copy_":
        with torch.no_grad():
            for w in weights:
                w.copy_(w * 1.5)
    elif route == "no_grad_mul":
        with torch.no_grad():
            for w in weights:
                w.mul_(1.5)
    elif route.endswith("load_state_dict"):
        model.load_state_dict(_scaled_copy(build, kind))
    elif route.endswith("load_state_dict_assign"):
        model.load_state_dict(_scaled_copy(build, kind), assign=True)
    elif route == "ema":
        target = _scaled_copy(build, kind)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.mul_(0.5).add_(target[name], alpha=0.5)
    elif route.endswith("_float") or route == "to_cpu":  # convert, change the weights there, convert back
        dtype = {"half_float": torch.half, "bfloat16_float": torch.bfloat16}.get(route, torch.float64)
        model.to(torch.device("cpu"), dtype)
        with torch.no_grad():
            for w in _block_weights(model):
                w.mul_(1.5)
        model.float()
    else:
        raise AssertionError(route)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("route", OPTIMIZER_ROUTES + WRITE_ROUTES + CONVERSION_ROUTES)
def test_inference_follows_the_weights(kind, route, build, tiny):
    model = build(kind)
    images = torch.randn(2, 3, 64, 32) * 2
    labels = tiny.labels(2)
    swap = route.startswith("swap_")
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        before = _fused(model, images, **labels)  # an inference first: nothing it leaves behind may go stale
        _change_weights(model, build, kind, route, images, labels)
        fused, module_path = _both_paths(model, images, **labels)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert (fused - module_path).norm() <= 1e-5 * module_path.norm()
    assert (fused - before).abs().max() > 1e-3  # the change happened and shows
    if swap:  # swapped conversions replace the parameters: every one must have been swappable
        assert all(p.dtype == torch.float32 for p in model.parameters())


# ---- the frozen inference copy ----

@pytest.mark.parametrize("kind", KINDS)
def test_frozen_copy_is_a_snapshot_that_refuses_changes(kind, build, tiny):
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny.labels(2)
    frozen = optimize_for_inference(model)
    first = frozen(images, **labels)
    assert list(frozen.parameters()) == [] and frozen.state_dict() == {}
    assert frozen.grid_size == model.grid_size  # descriptions answer as the model's
    for refused in (lambda: frozen.train(), lambda: frozen.load_state_dict(model.state_dict()),
                    lambda: frozen.double(), lambda: frozen.to("cpu"), lambda: frozen.half()):
        with pytest.raises(InferenceModelError, match="optimize_for_inference"):
            refused()
    frozen.eval()  # allowed: it is in eval mode already
    # changing the original does not reach the snapshot
    with torch.no_grad():
        for w in _block_weights(model):
            w.mul_(2.0)
    torch.testing.assert_close(frozen(images, **labels), first, atol=0, rtol=0)
    # a fresh copy of the changed model follows it
    torch.testing.assert_close(optimize_for_inference(model)(images, **labels),
                               _module_path(model, images, **labels), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not dispatch.MKL_PACKING_AVAILABLE, reason="packed copies exist only with MKL's kernels")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("write", ["no_grad_mul", "data_assignment"])
def test_frozen_copy_refuses_stale_packed_weights(kind, write, build):
    # the snapshot is private, but written to anyway (here by reaching into it) it raises instead of
    # computing with copies packed from the old values
    frozen = optimize_for_inference(build(kind, camera_num=0, view_num=0))
    images = torch.randn(2, 3, 64, 32)
    frozen(images)
    (packs,) = frozen.packed_weights.values()
    assert len(packs) == 8  # qkv, proj, fc1, fc2 in 2 blocks
    weight = _block_weights(frozen.model)[0]
    if write == "no_grad_mul":
        with torch.no_grad():
            weight.mul_(2.0)
    else:
        weight.data = weight.data * 2.0
    with pytest.raises(InferenceModelError, match="changed after it was frozen"):
        frozen(images)


@pytest.mark.skipif(not dispatch.MKL_PACKING_AVAILABLE, reason="packed copies exist only with MKL's kernels")
@pytest.mark.parametrize("kind", KINDS)
def test_frozen_copy_pickles_and_copies_without_its_packed_weights(kind, build):
    frozen = optimize_for_inference(build(kind, camera_num=0, view_num=0))
    images = torch.randn(2, 3, 64, 32)
    reference = frozen(images)
    buffer = io.BytesIO()
    torch.save(frozen, buffer)
    duplicates = [pickle.loads(pickle.dumps(frozen)), copy.deepcopy(frozen),
                  torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]
    for duplicate in duplicates:
        (packs,) = duplicate.packed_weights.values()
        assert len(packs) == 0
        torch.testing.assert_close(duplicate(images), reference, atol=0, rtol=0)
        assert len(packs) == 8


# ---- chunks, traced and compiled graphs ----

@pytest.mark.parametrize("kind", KINDS)
def test_large_batches_run_in_chunks_of_whole_images(kind, runner, monkeypatch, build, tiny):
    # 9 tokens per image, at most 20 rows a chunk: 11 images, ceil(99 / 20) = 5 chunks wanted, so
    # ceil(11 / 5) = 3 images a chunk: 3, 3, 3, 2, each through both blocks before the next chunk starts
    monkeypatch.setattr(blocks, "CHUNK_ROWS", 20)
    model = build(kind)
    images = torch.randn(11, 3, 64, 32) * 2
    labels = tiny.labels(11)
    calls = []
    original = blocks.attention
    monkeypatch.setattr(blocks, "attention", lambda q, k, v: calls.append(q.shape[0]) or original(q, k, v))
    fused, module_path = _both_paths(model, images, runner, **labels)
    assert calls == [3, 3, 3, 3, 3, 3, 2, 2]
    torch.testing.assert_close(fused, module_path, atol=1e-5, rtol=1e-5)
    alone = _fused(model, images[-1:], runner, **{k: v[-1:] for k, v in labels.items()})
    torch.testing.assert_close(alone, fused[-1:], atol=1e-5, rtol=1e-5)


def test_weights_made_in_inference_mode(runner, build):
    with torch.inference_mode():
        model = build("vit", camera_num=0, view_num=0)
    images = torch.randn(2, 3, 64, 32)
    first = _fused(model, images, runner)
    with torch.inference_mode():
        for w in _block_weights(model):
            w.mul_(2.0)
    second, module_path = _both_paths(model, images, runner)
    torch.testing.assert_close(second, module_path, atol=1e-5, rtol=1e-5)
    assert (second - first).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_traced_graphs_hold_no_fused_ops(kind, build, tiny):
    # export / jit.trace see the module path: portable graphs of aten ops
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny.labels(2)
    with torch.no_grad():
        exported = torch.export.export(model, (images,), labels)
        traced = torch.jit.trace(build(kind, camera_num=0, view_num=0), images, check_trace=False)
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


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_inference_calls_the_fused_path_as_one_op(kind, build, tiny):
    model = build(kind)
    images = torch.randn(5, 3, 64, 32) * 2
    labels = tiny.labels(5)
    fused, module_path = _both_paths(model, images, **labels)
    results = []

    def infer(compiled):
        with torch.inference_mode():
            results.append(compiled(images, **labels))

    graphs = _compiled_graphs(model, infer)
    assert len(graphs) == 1 and graphs[0].count("reid_ms.fused_blocks") == 1
    torch.testing.assert_close(results[0], fused, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[0], module_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_and_eager_take_the_same_path(kind, build, tiny):
    # training, autocast, input gradients, hooks and oneDNN switched off: the module path, eager and compiled
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny.labels(2)

    def train_step(compiled):
        compiled(images, **labels).square().mean().backward()

    def autocast_inference(compiled):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            compiled(images, **labels)

    def input_gradient(compiled):  # eval mode with autograd on (attribution): the module path has derivatives
        compiled(images.clone().requires_grad_(True), **labels).sum().backward()

    def without_onednn(compiled):
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            with torch.inference_mode():
                compiled(images, **labels)
                assert explain_path(model, images, **labels)[0].blocks == "module"
        finally:
            torch.backends.mkldnn.enabled = enabled

    graphs = _compiled_graphs(model.train(), train_step) + _compiled_graphs(model.eval(), autocast_inference)
    graphs += _compiled_graphs(model, input_gradient) + _compiled_graphs(model, without_onednn)
    handle = _block_layer(model, 0).register_forward_hook(lambda m, i, o: None)
    graphs += _compiled_graphs(model, lambda compiled: compiled(images, **labels))
    handle.remove()
    assert len(graphs) == 5 and not any("fused_blocks" in g for g in graphs)


def test_fused_blocks_op_registration(build):
    # schema, fake (shape) implementation and eager kernel agree: torch.library's own consistency check
    from reid_ms.kernels.compiled import run_compiled

    model = build("vit", camera_num=0, view_num=0)
    tokens = torch.randn(3, 9, 64)
    params = [model.block_params(b) for b in model.blocks]
    assert all(isinstance(p, BlockParams) for p in params)
    # inference only (no autograd formula): the check runs on tensors that need no gradient
    flat = [t.detach() for p in params for t in p.tensors()]
    torch.library.opcheck(torch.ops.reid_ms.fused_blocks.default, (tokens, flat, 4, 1e-6, "gelu"))
    with torch.inference_mode():
        torch.testing.assert_close(run_compiled(tokens, params, 4, "gelu"), model.forward_blocks(tokens),
                                   atol=1e-6, rtol=1e-6)


# ---- one decision, reported ----

@pytest.mark.parametrize("kind", KINDS)
def test_explain_path_names_the_path_that_ran_and_why(kind, two_threads, build, tiny):
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny.labels(2)

    def explained():
        return explain_path(model, images, **labels)[0]

    with torch.no_grad():
        choice = explained()
        assert (choice.blocks, choice.attention) == ("fused", "explicit")
        assert _ops(lambda: model(images, **labels)) & FAST_OPS == {FUSED_OP}
        model.set_fused_inference(False)
        assert "set_fused_inference(False)" in str(explained())
        model.set_fused_inference(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert "autocast" in str(explained())
        torch.set_num_threads(1)
        choice = explained()
        assert (choice.blocks, choice.attention) == ("fused", "sdpa") and "1 threads" in str(choice)
        torch.set_num_threads(2)
        model.train()
        assert explained().reasons == ("train mode",)
        model.eval()
    choice = explained()
    assert choice.blocks == "module" and "autograd is recording" in str(choice)
    assert choice.attention == "per_image"  # the q/k/v product needs gradients for the weights
    model.set_grad_checkpointing(True)
    for mode in (True, False):  # both backbones checkpoint under the same rule, in train and eval mode
        model.train(mode)
        assert explained().blocks == "checkpointed"
    with torch.no_grad():
        assert explained().blocks == "fused"


@pytest.mark.parametrize("kind", KINDS)
def test_checkpointing_follows_one_rule_for_both_backbones(kind, monkeypatch, build, tiny):
    model = build(kind)
    images = torch.randn(2, 3, 64, 32)
    labels = tiny.labels(2)
    reference = model(images, **labels)
    model.set_grad_checkpointing(True)
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(common, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed = model(images, **labels)  # eval mode, autograd on
    assert len(calls) == 2
    torch.testing.assert_close(checkpointed, reference, atol=1e-6, rtol=1e-6)


@pytest.mark.full
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stride", [16, 12])  # 129 tokens: explicit attention; 211: SDPA
def test_full_size_fused_equals_module_path(kind, stride):
    torch.manual_seed(0)
    model = (VitTrans(stride_size=stride) if kind == "vit" else ClipVisual(stride_size=stride)).eval()
    images = torch.randn(2, 3, 256, 128)
    module_path = _module_path(model, images)
    torch.testing.assert_close(_fused(model, images), module_path, atol=1e-5, rtol=1e-5)
    if dispatch.MKL_PACKING_AVAILABLE and stride == 16:
        torch.testing.assert_close(_fused(model, images, "frozen"), module_path, atol=1e-5, rtol=1e-5)


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


def test_empty_token_batch_through_the_blocks(build):
    # forward() refuses an empty batch; forward_blocks() on tokens passes it through like the module path
    model = build("vit")
    with torch.inference_mode():
        assert model.forward_blocks(torch.randn(0, 9, 64)).shape == (0, 9, 64)
