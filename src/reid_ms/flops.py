"""Counting floating-point operations of a forward pass, fused attention and fused linear kernels included.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products and convolutions (multiply and add
counted separately) of aten's ops only. The CPU inference paths call kernels it has no formula for: the
CPU flash-attention kernel that ``F.scaled_dot_product_attention`` dispatches to, and the oneDNN / MKL
linear kernels (``torch.ops.mkldnn._linear_pointwise``, ``torch.ops.mkl._mkl_linear``) that the fused
backbone path and the dense multi-scale neck use. Without the formulas registered here a count would
depend on which path ran (the dense neck's window products, for one, would be missed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    *batch, lq, e = query_shape
    lk, ev = key_shape[-2], value_shape[-1]
    b = math.prod(batch)
    return 2 * b * lq * lk * e + 2 * b * lq * lk * ev


def _linear_flops(x_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # x [..., K] @ W.T -> [..., N]: every output element takes K products and K additions
    return 2 * math.prod(out_shape) * x_shape[-1]


def _extra_formulas() -> dict[Any, Any]:
    formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    # hasattr on torch.ops looks the op up (a build without MKL has no mkl ops)
    for namespace, op in (("mkldnn", "_linear_pointwise"), ("mkl", "_mkl_linear")):
        packet = getattr(getattr(torch.ops, namespace), op, None) if hasattr(torch.ops, namespace) else None
        if packet is not None:
            formulas[packet] = _linear_flops
    return formulas


def count_flops(model: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs (multiply and add counted separately) of ``model(*args, **kwargs)`` in inference mode.

    Matrix products and convolutions, the neck's and the adapter's included; elementwise work (norms,
    activations, the neck's tile sums) is not counted, as in ``FlopCounterMode`` and fvcore.
    """
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())
