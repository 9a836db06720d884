"""FLOP counting must include the fused attention kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reid_ms.flops import count_flops


class _Explicit(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


class _Fused(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_fused_attention_counted_like_explicit():
    q, k, v = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    with FlopCounterMode(display=False) as counter:
        _Explicit()(q, k, v)
    explicit = counter.get_total_flops()
    assert explicit == 2 * (2 * 3 * 17 * 11 * 8) * 2  # two batched matmuls, multiply + add
    assert count_flops(_Fused(), q, k, v) == explicit


def test_linear_layers_counted():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.GELU(), torch.nn.Linear(20, 5))
    assert count_flops(model, torch.randn(4, 10)) == 2 * 4 * (10 * 20 + 20 * 5)


def test_vit_counted_like_the_hand_formula():
    from reid_ms import VitTrans

    d, depth, tokens, patches = 64, 2, 1 + 16 * 8, 16 * 8
    model = VitTrans(embed_dim=d, depth=depth, num_heads=4).eval()
    per_block = 2 * tokens * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * tokens * tokens * d
    patch_conv = 2 * patches * (3 * 16 * 16) * d
    assert count_flops(model, torch.randn(1, 3, 256, 128)) == depth * per_block + patch_conv
