"""Oracles for the ClipVisual tests: open_clip models, an OpenAI-style CLIP written the way OpenAI's
``clip/model.py`` builds it (``nn.MultiheadAttention``, sequence-first, fp16 conversion), CLIP-ReID's
forward written out by hand, and CLIP-ReID's position-table resize."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import VisionTransformer
from torch import nn

TINY = dict(width=64, layers=2, heads=4, output_dim=32)


def randomise_norms_and_biases(model: nn.Module, seed: int = 0) -> None:
    """Random (not 1/0) LayerNorm weights and biases, so a mis-mapped tensor changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln" in name or name.startswith("ln"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def open_clip_visual(image_size=(64, 32), patch_size=16, width=64, layers=2, heads=4, output_dim=32,
                     seed=0) -> VisionTransformer:
    """open_clip's VisionTransformer with QuickGELU (OpenAI's activation), random weights, eval mode."""
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                              heads=heads, mlp_ratio=4.0, output_dim=output_dim, act_layer=OpenClipQuickGELU)
    randomise_norms_and_biases(model, seed)
    return model.eval()


def open_clip_model(image_size=32, patch_size=8, width=64, layers=2, output_dim=32, seed=0) -> CLIP:
    """A tiny open_clip CLIP (both towers, QuickGELU); its state dict has OpenAI's layout."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=layers, width=width, head_width=16, patch_size=patch_size, image_size=image_size)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=1)
    model = CLIP(embed_dim=output_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    randomise_norms_and_biases(model.visual, seed)
    return model.eval()


def open_clip_tokens(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's own outputs: the projected CLS ``[B, out]`` and every token after ``ln_post`` ``[B, T, width]``."""
    seen = []
    handle = visual.ln_post.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        pooled = visual(images)
    finally:
        handle.remove()
    return pooled, seen[0]


def clip_reid_resize(pos: torch.Tensor, old_hw, new_hw) -> torch.Tensor:
    """CLIP-ReID's ``resize_pos_embed``: CLS row kept, grid resized with F.interpolate(mode='bilinear')."""
    d = pos.shape[-1]
    grid = pos[1:].reshape(1, old_hw[0], old_hw[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bilinear")
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, d)])


def clip_reid_forward(state: dict[str, torch.Tensor], images: torch.Tensor, stride: int, heads: int,
                      row: torch.Tensor | None = None, sie_coef: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-ReID's image encoder written out from a state dict: returns ``(x12, xproj)``, every token.

    The camera/view vector ``sie_coef * cv_embed[row]`` goes on the CLS token before the position
    embedding; attention is an explicit softmax, QuickGELU its formula, LayerNorm eps 1e-5.
    """
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    x = F.conv2d(images, state["conv1.weight"], stride=stride).flatten(2).transpose(1, 2)
    b, _, d = x.shape
    cls = state["class_embedding"].expand(b, d)
    if row is not None:
        cls = cls + sie_coef * state["cv_embed"][row]
    x = torch.cat([cls[:, None], x], dim=1) + state["positional_embedding"]
    x = ln(x, "ln_pre")
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        q, k, v = (h @ state[p + "attn.in_proj_weight"].t() + state[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, -1, d)
        x = x + att @ state[p + "attn.out_proj.weight"].t() + state[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2") @ state[p + "mlp.c_fc.weight"].t() + state[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ state[p + "mlp.c_proj.weight"].t() + state[p + "mlp.c_proj.bias"]
    x = ln(x, "ln_post")
    return x, x @ state["proj"]


# --- OpenAI's CLIP, structured as clip/model.py builds it, for writing TorchScript archives -------------

class _OpenAILayerNorm(nn.LayerNorm):
    """OpenAI's LayerNorm: computed in fp32, cast back to the input dtype (fp16 weights elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class _OpenAIQuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _OpenAIBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = _OpenAILayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _OpenAIQuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = _OpenAILayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, B, width], sequence first
        mask = self.attn_mask.to(x.dtype) if self.attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenAITransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[_OpenAIBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class _OpenAIVisual(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int) -> None:
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = _OpenAILayerNorm(width)
        self.transformer = _OpenAITransformer(width, layers, heads)
        self.ln_post = _OpenAILayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.type(self.conv1.weight.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAIStyleCLIP(nn.Module):
    """OpenAI's CLIP layout: ``visual.*``, the text tower at the top level, ``logit_scale`` and the
    integer entries ``input_resolution``, ``context_length``, ``vocab_size``; forward = encode_image."""

    def __init__(self, input_resolution=32, patch_size=8, width=64, layers=2, heads=4, output_dim=32,
                 context_length=16, vocab_size=100, text_width=32, text_heads=2, text_layers=1, seed=0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.visual = _OpenAIVisual(input_resolution, patch_size, width, layers, heads, output_dim)
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.transformer = _OpenAITransformer(text_width, text_layers, text_heads, attn_mask=mask)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
        self.ln_final = _OpenAILayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, output_dim) * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.register_buffer("input_resolution", torch.tensor(input_resolution))
        self.register_buffer("context_length", torch.tensor(context_length))
        self.register_buffer("vocab_size", torch.tensor(vocab_size))
        randomise_norms_and_biases(self.visual, seed)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


def convert_to_openai_fp16(model: nn.Module) -> nn.Module:
    """OpenAI's ``convert_weights``: conv/linear/attention weights and the projections to fp16; the
    embeddings and LayerNorms stay fp32."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            m.in_proj_weight.data = m.in_proj_weight.data.half()
            m.in_proj_bias.data = m.in_proj_bias.data.half()
        for name in ("text_projection", "proj"):
            if isinstance(getattr(m, name, None), nn.Parameter):
                getattr(m, name).data = getattr(m, name).data.half()
    return model


def write_openai_archive(path, model: OpenAIStyleCLIP) -> torch.jit.ScriptModule:
    """Trace ``model`` (already converted to fp16) on one image and ``torch.jit.save`` it, as OpenAI did."""
    res = int(model.input_resolution)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, 3, res, res), check_trace=False)
    traced.save(str(path))
    return traced
