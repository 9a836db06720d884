"""Oracles for the text-side tests: open_clip CLIP models with a small text tower, CLIP's text transformer
written out by hand from a state dict, and CLIP-ReID checkpoints assembled the way CLIP-ReID saves them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

from _helpers_clip import randomise_norms_and_biases

# A small text tower with CLIP's vocabulary and context (so open_clip's tokenizer output fits it).
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, layers=2, heads=4, output_dim=32)
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def open_clip_text_model(width=64, layers=2, heads=4, output_dim=32, context_length=77, vocab_size=49408,
                         seed=0) -> CLIP:
    """An open_clip CLIP (QuickGELU) with the given text tower and a minimal image tower, random text
    LayerNorms and biases, eval mode. Its state dict has OpenAI's layout."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    text = CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads, layers=layers)
    model = CLIP(embed_dim=output_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    randomise_norms_and_biases(model.transformer, seed)
    randomise_norms_and_biases(model.ln_final, seed + 1)
    return model.eval()


def text_state(model: CLIP) -> dict[str, torch.Tensor]:
    """The text-tower entries of an open_clip / OpenAI state dict, under ClipText's names."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(TEXT_PREFIXES)}


def text_forward_by_hand(state: dict[str, torch.Tensor], embedded: torch.Tensor, eot: torch.Tensor,
                         heads: int) -> torch.Tensor:
    """CLIP's text transformer from a state dict: ``embedded`` ``[B, L, D]`` (before the position
    embedding), ``eot`` ``[B]`` positions -> ``[B, output_dim]``.

    Pre-norm blocks, softmax attention with a causal mask (``-inf`` above the diagonal), QuickGELU as its
    formula, LayerNorm eps 1e-5, ``ln_final``, the row at ``eot``, times ``text_projection``.
    """
    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-5)

    b, length, d = embedded.shape
    x = embedded + state["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = ln(x, p + "ln_1")
        q, k, v = (h @ state[p + "attn.in_proj_weight"].t() + state[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + mask, dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, length, d)
        x = x + att @ state[p + "attn.out_proj.weight"].t() + state[p + "attn.out_proj.bias"]
        h = ln(x, p + "ln_2") @ state[p + "mlp.c_fc.weight"].t() + state[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ state[p + "mlp.c_proj.weight"].t() + state[p + "mlp.c_proj.bias"]
    x = ln(x, "ln_final")
    return x[torch.arange(b), eot] @ state["text_projection"]
