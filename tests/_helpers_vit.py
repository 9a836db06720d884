"""Oracles for the VitTrans tests: timm models, Google's .npz layout and TransReID's forward, written out."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

TINY = dict(embed_dim=32, depth=2, num_heads=4)


def timm_vit(img_size=(64, 64), embed_dim=32, depth=2, num_heads=4, seed=0) -> VisionTransformer:
    """A randomly initialised timm ViT (patch 16, qkv bias, eps 1e-6) without a classifier, in eval mode."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=0, qkv_bias=True)
    # Random (not zero) biases and norms, so a mis-mapped tensor changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def bilinear_grid(pos_embed: torch.Tensor, old_hw, new_hw, n_prefix: int = 1) -> torch.Tensor:
    """The position table TransReID builds: prefix rows kept, the grid resized bilinearly (no antialias)."""
    d = pos_embed.shape[-1]
    grid = pos_embed[0, n_prefix:].reshape(1, old_hw[0], old_hw[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bilinear", align_corners=False)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, d)), dim=1)


def google_npz(state: dict[str, torch.Tensor], num_heads: int, path, extra: dict | None = None) -> None:
    """Write a timm ViT state dict in Google's vision_transformer .npz layout (kernels [in, out], HWIO)."""
    d = state["cls_token"].shape[-1]
    hd = d // num_heads
    out = {
        "embedding/kernel": state["patch_embed.proj.weight"].permute(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "cls": state["cls_token"],
        "Transformer/posembed_input/pos_embedding": state["pos_embed"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        att = g + "MultiHeadDotProductAttention_1/"
        out[g + "LayerNorm_0/scale"] = state[b + "norm1.weight"]
        out[g + "LayerNorm_0/bias"] = state[b + "norm1.bias"]
        qkv_w = state[b + "attn.qkv.weight"].chunk(3)
        qkv_b = state[b + "attn.qkv.bias"].chunk(3)
        for n, w, bias in zip(("query", "key", "value"), qkv_w, qkv_b):
            out[att + n + "/kernel"] = w.t().reshape(d, num_heads, hd)
            out[att + n + "/bias"] = bias.reshape(num_heads, hd)
        out[att + "out/kernel"] = state[b + "attn.proj.weight"].t().reshape(num_heads, hd, d)
        out[att + "out/bias"] = state[b + "attn.proj.bias"]
        out[g + "LayerNorm_2/scale"] = state[b + "norm2.weight"]
        out[g + "LayerNorm_2/bias"] = state[b + "norm2.bias"]
        for r in (0, 1):
            out[g + f"MlpBlock_3/Dense_{r}/kernel"] = state[b + f"mlp.fc{r + 1}.weight"].t()
            out[g + f"MlpBlock_3/Dense_{r}/bias"] = state[b + f"mlp.fc{r + 1}.bias"]
        i += 1
    out.update(extra or {})
    np.savez(path, **{k: v.detach().numpy() for k, v in out.items()})


def transreid_forward(state: dict[str, torch.Tensor], images: torch.Tensor, stride: int, row, sie_coef: float,
                      num_heads: int) -> torch.Tensor:
    """TransReID's forward from a (``base.``-stripped) state dict: conv, CLS, + pos + coef * sie[row] on
    every token, then timm blocks and the final norm. ``row`` is a [B] long tensor or None."""
    d = state["cls_token"].shape[-1]
    depth = sum(1 for k in state if k.endswith("norm1.weight"))
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((state["cls_token"].expand(x.shape[0], -1, -1), x), dim=1)
    x = x + state["pos_embed"]
    if row is not None:
        x = x + sie_coef * state["sie_embed"][row]
    ref = VisionTransformer(img_size=(16, 16), patch_size=16, embed_dim=d, depth=depth, num_heads=num_heads,
                            num_classes=0, qkv_bias=True).eval()
    ref.blocks.load_state_dict({k[len("blocks."):]: v for k, v in state.items() if k.startswith("blocks.")})
    ref.norm.load_state_dict({k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")})
    with torch.no_grad():
        return ref.norm(ref.blocks(x))
