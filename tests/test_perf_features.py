"""Speed features of the backbones: bf16 autocast on fp16 CLIP weights (compiling with labels: test_backbones.py)."""

from __future__ import annotations

import torch

from reid_ms import ClipVisual, load_clip_weights


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
