"""Speed features of the backbones: chunked inference, bf16 autocast on fp16 CLIP weights, compile with labels."""

from __future__ import annotations

import pytest
import torch

from _helpers_backbones import tiny_backbone, tiny_labels
from reid_ms import ClipVisual, load_clip_weights

# 64x32 at patch 16, stride 16: 4x2 patches + CLS = 9 tokens; 20 tokens per chunk -> chunks of 2 images
CHUNK_TOKENS = 20


def _build(kind: str) -> torch.nn.Module:
    return tiny_backbone(kind, 0.1)


@pytest.mark.parametrize("kind", ["vit", "clip"])
@pytest.mark.parametrize("batch", [1, 2, 5, 7])
def test_chunked_inference_equals_one_call_and_per_image(kind, batch):
    model = _build(kind)
    images = torch.randn(batch, 3, 64, 32)
    labels = tiny_labels(batch)
    with torch.inference_mode():
        model.inference_chunk_tokens = 0
        whole = model(images, **labels)
        single = torch.cat([model(images[i:i + 1], **{k: v[i:i + 1] for k, v in labels.items()})
                            for i in range(batch)])
        model.inference_chunk_tokens = CHUNK_TOKENS
        chunked = model(images, **labels)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked, single, atol=1e-5, rtol=1e-5)


def test_chunked_inference_with_unprojected_clip_tokens():
    model = _build("clip")
    images = torch.randn(5, 3, 64, 32)
    with torch.no_grad():
        model.inference_chunk_tokens = 0
        whole = model(images, **tiny_labels(5), project=False)
        model.inference_chunk_tokens = CHUNK_TOKENS
        chunked = model(images, **tiny_labels(5), project=False)
    assert chunked.shape == (5, 9, 64)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_training_forward_is_not_chunked_and_gradients_match(kind):
    # with autograd on the batch runs whole; the gradient equals the one of an unchunked model
    model = _build(kind).train()
    images = torch.randn(5, 3, 64, 32)
    model.inference_chunk_tokens = CHUNK_TOKENS
    torch.manual_seed(3)  # the same drop-path draws in both runs
    model(images, **tiny_labels(5)).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.inference_chunk_tokens = 0
    torch.manual_seed(3)
    model(images, **tiny_labels(5)).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_compile_fullgraph_with_labels_on_a_chunk_sized_batch(kind):
    # in inference with a batch larger than one chunk: chunking is skipped while tracing, no graph break
    model = _build(kind)
    model.inference_chunk_tokens = CHUNK_TOKENS
    images = torch.randn(5, 3, 64, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(images, **tiny_labels(5)), model(images, **tiny_labels(5)),
                                   atol=1e-5, rtol=1e-5)


def _fp16_openai_state(model: ClipVisual) -> dict[str, torch.Tensor]:
    """OpenAI's file layout: ``visual.``-less keys here, conv/linear/projection weights fp16, the rest fp32;
    weights scaled up so the MLP's hidden activations pass fp16's largest value (65504)."""
    state = {}
    for name, p in model.state_dict().items():
        t = p.detach().clone()
        if name.endswith("c_fc.weight"):
            t = t * 5e4
        fp16 = name.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")) \
            or name in ("conv1.weight", "proj")
        state[name] = t.half() if fp16 else t
    return state


def test_bf16_autocast_on_fp16_openai_weights_is_finite(tmp_path):
    torch.manual_seed(0)
    source = ClipVisual(img_size=(64, 32), width=64, layers=2, heads=4, output_dim=32)
    state = _fp16_openai_state(source)
    path = tmp_path / "openai_like.pt"
    torch.save(state, path)
    model = ClipVisual(img_size=(64, 32), width=64, layers=2, heads=4, output_dim=32).eval()
    load_clip_weights(model, path)
    images = torch.randn(4, 3, 64, 32) * 3
    with torch.inference_mode():
        hidden = []
        handle = model.transformer.resblocks[0].mlp.c_fc.register_forward_hook(lambda m, i, o: hidden.append(o))
        ref = model(images)
        handle.remove()
        assert hidden[0].abs().max() > 65504, "the test weights must overflow fp16 to mean anything"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the output's scale
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    assert torch.isfinite(ref).all()
