"""FLOP counting must include the fused attention and linear kernels, so a built model's count has its neck."""

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


def _vit_by_hand(d: int, depth: int, grid: tuple[int, int], batch: int) -> int:
    """ViT-B-shaped backbone (MLP ratio 4, patch 16, 3 channels): blocks plus the patch convolution."""
    patches = grid[0] * grid[1]
    tokens = 1 + patches
    per_block = 2 * tokens * d * (3 * d + d + 2 * 4 * d) + 2 * 2 * tokens * tokens * d
    return batch * (depth * per_block + 2 * patches * (3 * 16 * 16) * d)


def _dense_neck_by_hand(d: int, scales: tuple[int, ...], batch: int) -> int:
    # A stride-s window then a global average is one linear map of the mean s x s tile: [D, D * s * s] times
    # a vector, whatever the grid. Tile sums are additions, not counted (as FlopCounterMode counts).
    return batch * sum(2 * d * d * s * s for s in scales)


def test_built_model_counts_the_dense_neck_and_the_adapter(tiny):
    # the tiny size: width 32, stride 12 at 64x32, a 5 x 2 grid that no window of (2, 4) divides; batch 2
    model = tiny.build("vit_b16_ms", blocks=1).eval()
    images = tiny.images(2)
    assert count_flops(model, images) == _vit_by_hand(32, 1, (5, 2), 2) + _dense_neck_by_hand(32, (2, 4), 2)
    # the adapter: one Linear(24 -> 40) on each of the 1 + 5 * 2 tokens
    clip = tiny.build("clip_b16_adapt_ms", blocks=1).eval()
    bare = tiny.backbone("clip", blocks=1).eval()
    extra = count_flops(clip, images) - count_flops(bare, images)
    assert extra == 2 * 2 * 11 * 24 * 40 + _dense_neck_by_hand(40, (2, 4), 2)


def test_full_size_vit_b16_ms_at_stride_12_by_hand():
    import reid_ms

    # shapes only (meta tensors): the same products as on the CPU, without allocating 1.1 GB of weights
    with torch.device("meta"):
        model = reid_ms.build("vit_b16_ms", stride_size=12).eval()   # 21 x 10 grid
        images = torch.randn(1, 3, 256, 128)
    expected = _vit_by_hand(768, 12, (21, 10), 1) + 2 * 768 * 768 * (16 + 64 + 256)
    assert count_flops(model, images) == expected
