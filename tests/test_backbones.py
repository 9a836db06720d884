"""What both backbones promise alike, parametrized by kind: gradients, checkpointing, compiled graphs, labels,
errors, weight-decay names."""

from __future__ import annotations

import pytest
import torch

from reid_ms import ConfigError, InputError

KINDS = ["vit", "clip"]
CLASS = {"vit": "VitTrans", "clip": "ClipVisual"}
CAMERA_VIEW = [(0, 0), (4, 0), (0, 3), (4, 3)]


@pytest.mark.parametrize("kind", KINDS)
def test_grad_checkpointing_same_outputs_and_grads(kind, tiny):
    model = tiny.backbone(kind, camera_num=3).train()
    images, cams = tiny.images(2), torch.tensor([2, 0])
    out = model(images, cam_label=cams)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n   # every parameter is reached
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(images, cam_label=cams)
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out, atol=0, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


def _check_compiled(kind: str, tiny, backend: str) -> None:
    # noisy norms and biases: a label or scale the graph dropped would show
    model = tiny.backbone(kind, side_info=True, vector_noise=0.1).eval()
    images, labels = tiny.images(5), tiny.labels(5)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    for grad_mode in (torch.no_grad, torch.inference_mode):
        with grad_mode():
            # the trace holds the module path, eager may run the fused CPU path: equal up to float rounding
            torch.testing.assert_close(compiled(images, **labels), model(images, **labels), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_without_graph_breaks(kind, tiny):
    """The label checks run under dynamo without a graph break (aot_eager traces, it does not generate code)."""
    _check_compiled(kind, tiny, "aot_eager")


@pytest.mark.full
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph_inductor(kind, tiny):
    _check_compiled(kind, tiny, "inductor")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [dict(sie_coef="abc"), dict(sie_coef=float("nan")), dict(sie_coef=True),
                                 dict(mlp_ratio="abc"), dict(mlp_ratio=float("inf")), dict(mlp_ratio=0.0)])
def test_non_numbers_are_refused_when_built_not_at_the_first_forward(kind, bad, tiny):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=f"{CLASS[kind]}: {name} must be"):
        tiny.backbone(kind, blocks=1, **bad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("camera_num, view_num", CAMERA_VIEW)
def test_gradient_reaches_every_parameter(kind, camera_num, view_num, tiny):
    model = tiny.backbone(kind, camera_num=camera_num, view_num=view_num).train()
    kw = dict(cam_label=torch.tensor([0, 1]) if camera_num else None,
              view_label=torch.tensor([1, 2]) if view_num else None)
    model(tiny.images(2), **kw).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("camera_num, view_num", CAMERA_VIEW[1:])
def test_labels_as_int_list_and_tensor_agree(kind, camera_num, view_num, tiny):
    model = tiny.backbone(kind, camera_num=camera_num, view_num=view_num, vector_noise=0.1).eval()
    images = tiny.images(2)
    kw_int = dict(cam_label=1 if camera_num else None, view_label=2 if view_num else None)
    kw_list = {k: [v, v] if v is not None else None for k, v in kw_int.items()}
    kw_t = {k: torch.tensor([v, v]) if v is not None else None for k, v in kw_int.items()}
    with torch.no_grad():
        expected = model(images, **kw_t)
        for kw in (kw_int, kw_list):
            torch.testing.assert_close(model(images, **kw), expected, atol=0, rtol=0)
        other = {k: torch.tensor([0, 0]) if v is not None else None for k, v in kw_int.items()}
        assert not torch.allclose(model(images, **other), expected)   # the labels do act


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kwargs, match", [
    (dict(width=30), "not divisible by"),   # 4 heads
    (dict(img_size=(8, 32)), "smaller than patch_size"),
    (dict(img_size=(64, 32, 3)), "img_size"),
    (dict(stride_size=0), "stride_size"),
    (dict(camera_num=-1), "camera_num"),
])
def test_config_errors(kind, kwargs, match, tiny):
    with pytest.raises(ConfigError, match=match):
        tiny.backbone(kind, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("images, match", [
    (torch.randn(2, 1, 64, 32), "in_chans=3"),
    (torch.randn(2, 3, 64, 64), "64x32"),
    (torch.randn(2, 3, 32, 32), "64x32"),
    (torch.randn(3, 64, 32), "unsqueeze"),
    (torch.zeros(2, 3, 64, 32, dtype=torch.uint8), "floating-point"),
])
def test_image_errors(kind, images, match, tiny):
    with pytest.raises(InputError, match=match):
        tiny.backbone(kind)(images)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("camera_num, view_num, kw, match", [
    (3, 0, dict(), "needs cam_label"),
    (0, 0, dict(cam_label=0), "camera_num=0"),
    (0, 2, dict(cam_label=torch.tensor([0, 1]), view_label=torch.tensor([0, 1])), "camera_num=0"),
    (3, 0, dict(cam_label=torch.tensor([0, 3])), r"\[0, 2\]"),
    (3, 0, dict(cam_label=torch.tensor([-1, 0])), r"\[0, 2\]"),
    (3, 0, dict(cam_label=0, view_label=1), "view_num=0"),
    (3, 2, dict(cam_label=torch.tensor([0, 1]), view_label=torch.tensor([0, 2])), "view_num=2"),
    (3, 0, dict(cam_label=torch.tensor([0.0, 1.0])), "integer"),
    (3, 0, dict(cam_label=torch.tensor([0, 1, 2])), "one label per image"),
])
def test_label_errors(kind, camera_num, view_num, kw, match, tiny):
    with pytest.raises(InputError, match=match):
        tiny.backbone(kind, camera_num=camera_num, view_num=view_num)(tiny.images(2), **kw)


@pytest.mark.parametrize("kind, table, no_decay", [
    ("vit", "sie_embed", {"pos_embed", "cls_token", "sie_embed"}),
    ("clip", "cv_embed", {"positional_embedding", "class_embedding", "cv_embed"}),
])
def test_no_weight_decay_names_parameters_and_the_table_exists_only_when_asked(kind, table, no_decay, tiny):
    model = tiny.backbone(kind, camera_num=2)
    assert model.no_weight_decay() == no_decay
    assert no_decay <= {n for n, _ in model.named_parameters()}
    assert getattr(model, table).numel() == 2 * model.embed_dim
    without = tiny.backbone(kind)
    assert getattr(without, table) is None and table not in without.state_dict()
