"""The fused CPU inference path inside ``torch.compile``d graphs, as one opaque custom op.

Compiling a backbone for inference traces the module path, which Inductor turns into its own kernels
(packed linear layers when the weights are frozen, SDPA for attention). The eager fused path
(``_fast.py``) is as fast or faster: its explicit attention beats SDPA up to 192 tokens. So under
``torch.compile``, with the same conditions as eager (inference, fp32 CPU, no autocast, no hooks), the
blocks run as one call of the custom op ``reid_ms::fused_blocks``, which dynamo records without a graph
break and Inductor calls as it is. ``torch.export``, ONNX export and ``torch.jit`` tracing still see the
module path (portable graphs of aten ops).

Each backbone's :class:`~reid_ms.backbones._fast.PackedWeights` has an integer token; the op finds the
cache by it (a custom op takes tensors and numbers, not Python objects), so compiled and eager calls of
one model share its packed copies, and ``train()`` / ``set_fused_inference()`` free them as in eager.
No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the annotations.
"""

from types import SimpleNamespace
from typing import Optional

import torch

from reid_ms.backbones import _fast

# read once: dynamo does not trace torch.backends.mkldnn's functions
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available()

# tensors per block, in this order
BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias",
                "norm2.weight", "norm2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


@torch.library.custom_op("reid_ms::fused_blocks", mutates_args=(), device_types="cpu")
def fused_blocks(x: torch.Tensor, params: list[Optional[torch.Tensor]], num_heads: int, eps: float, activation: str,
                 packs_token: int) -> torch.Tensor:
    """:func:`~reid_ms.backbones._fast.run_fused` on ``x`` ``[B, T, D]``.

    ``params`` holds :data:`BLOCK_PARAMS` for each block in turn (``eps`` is both norms'); ``activation``
    is ``"gelu"`` or ``"quick_gelu"``; ``packs_token`` names the backbone's packed-weight cache.
    """
    n = len(BLOCK_PARAMS)
    layers = []
    for n1w, n1b, qw, qb, pw, pb, n2w, n2b, f1w, f1b, f2w, f2b in (params[i:i + n] for i in range(0, len(params), n)):
        layers.append((SimpleNamespace(weight=n1w, bias=n1b, eps=eps), qw, qb, SimpleNamespace(weight=pw, bias=pb),
                       SimpleNamespace(weight=n2w, bias=n2b, eps=eps), SimpleNamespace(weight=f1w, bias=f1b),
                       SimpleNamespace(weight=f2w, bias=f2b)))
    return _fast.run_fused(x.contiguous(), layers, num_heads, activation, _fast.PackedWeights.by_token(packs_token))


@fused_blocks.register_fake
def _fused_blocks_shape(x, params, num_heads, eps, activation, packs_token):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def compiled_path_active(x: torch.Tensor, module: torch.nn.Module, blocks: torch.nn.Module,
                         weight: torch.Tensor) -> bool:
    """Whether ``module`` is being compiled (not exported) for inference where the eager fused path applies."""
    return (torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.onnx.is_in_onnx_export()
            and module.fused_inference and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and (_fast.USE_MKL_PACKING or ONEDNN_AVAILABLE)
            and not _fast._hooked(blocks))


def run_blocks(x: torch.Tensor, layers: list[tuple], num_heads: int, activation: str,
               packs: "_fast.PackedWeights") -> torch.Tensor:
    """:func:`~reid_ms.backbones._fast.run_fused`'s arguments, as one call of the op (for a compiled graph)."""
    params = []
    for norm1, qkv_weight, qkv_bias, proj, norm2, fc1, fc2 in layers:
        params += [norm1.weight, norm1.bias, qkv_weight, qkv_bias, proj.weight, proj.bias,
                   norm2.weight, norm2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    return torch.ops.reid_ms.fused_blocks(x, params, num_heads, layers[0][0].eps, activation, packs.token)
