"""What both backbones promise alike, parametrized by kind: gradients, checkpointing, compiled graphs."""

from __future__ import annotations

import pytest
import torch

from reid_ms import ClipVisual, ConfigError, VitTrans

KINDS = ["vit", "clip"]


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


@pytest.mark.parametrize("cls, sizes", [(VitTrans, dict(embed_dim=32, depth=1, num_heads=4)),
                                        (ClipVisual, dict(width=32, layers=1, heads=4, output_dim=16))])
@pytest.mark.parametrize("bad", [dict(sie_coef="abc"), dict(sie_coef=float("nan")), dict(sie_coef=True),
                                 dict(mlp_ratio="abc"), dict(mlp_ratio=float("inf")), dict(mlp_ratio=0.0)])
def test_non_numbers_are_refused_when_built_not_at_the_first_forward(cls, sizes, bad):
    name = next(iter(bad))
    with pytest.raises(ConfigError, match=f"{cls.__name__}: {name} must be"):
        cls(img_size=(64, 32), **sizes, **bad)
