"""Counting floating-point operations of a forward pass, fused kernels included.

``torch.utils.flop_counter.FlopCounterMode`` counts aten's matrix products and convolutions only. The CPU
paths also call the flash-attention kernel of ``F.scaled_dot_product_attention`` and the oneDNN / MKL
linear kernels of the fused blocks and the dense neck; without the formulas registered here a count would
depend on the path that ran (the dense neck's window products, for one, would be missed).
"""

from __future__ import annotations

import math
from typing import Any, Callable

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


_EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
for _namespace, _op in (("mkldnn", "_linear_pointwise"), ("mkl", "_mkl_linear")):
    if hasattr(getattr(torch.ops, _namespace), _op):  # a build without oneDNN / MKL lacks the op
        _EXTRA_FORMULAS[getattr(getattr(torch.ops, _namespace), _op)] = _linear_flops


def count_flops(model: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs (multiply and add counted separately) of ``model(*args, **kwargs)`` in inference mode.

    Matrix products and convolutions, the neck's and the adapter's included; elementwise work (norms,
    activations, the neck's tile sums) is not counted, as in ``FlopCounterMode`` and fvcore.
    """
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(*args, **kwargs)
    return int(counter.get_total_flops())
