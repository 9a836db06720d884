"""Counting floating-point operations of a forward pass, fused attention included.

``torch.utils.flop_counter.FlopCounterMode`` has no formula for the CPU flash-attention kernel that
``F.scaled_dot_product_attention`` dispatches to, so on CPU it undercounts every ViT (22.06 instead of
22.68 GFLOP for ViT-B/16 at 256x128). The formula registered here counts ``Q K^T`` and ``A V``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    *batch, lq, e = query_shape
    lk, ev = key_shape[-2], value_shape[-1]
    b = 1
    for d in batch:
        b *= d
    return 2 * b * lq * lk * e + 2 * b * lq * lk * ev


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def count_flops(model: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs (multiply and add counted separately) of ``model(*args, **kwargs)`` in inference mode."""
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())
