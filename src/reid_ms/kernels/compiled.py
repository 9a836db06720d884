"""The fused CPU inference path inside ``torch.compile``'d graphs, as one opaque custom op.

Compiling a backbone for inference would trace the module path, which Inductor turns into its own
kernels. Where :func:`reid_ms.dispatch.block_path` picks ``"fused_op"`` (the conditions of the eager
fused path, while compiling), the blocks run as one call of ``reid_ms::fused_blocks`` instead, which
dynamo records without a graph break and Inductor calls as it is; inside, :func:`run_fused` runs
eagerly. ``torch.export``, ONNX export and ``torch.jit`` tracing still see the module path.
No ``from __future__ import annotations`` here: ``torch.library.custom_op`` reads the annotations.
"""

from collections.abc import Sequence
from typing import Optional

import torch

from reid_ms.kernels.blocks import TENSORS_PER_BLOCK, BlockParams, run_fused


@torch.library.custom_op("reid_ms::fused_blocks", mutates_args=(), device_types="cpu")
def fused_blocks(x: torch.Tensor, params: list[Optional[torch.Tensor]], num_heads: int, eps: float,
                 activation: str) -> torch.Tensor:
    """:func:`~reid_ms.kernels.blocks.run_fused` on ``x`` ``[B, T, D]``.

    ``params`` holds :meth:`BlockParams.tensors` of each block in turn (``eps`` is every norm's);
    ``activation`` is ``"gelu"`` or ``"quick_gelu"``.
    """
    n = TENSORS_PER_BLOCK
    blocks = [BlockParams(*params[i:i + n], eps) for i in range(0, len(params), n)]  # type: ignore[arg-type,call-arg]
    return run_fused(x.contiguous(), blocks, num_heads, activation)


@fused_blocks.register_fake
def _fused_blocks_shape(x, params, num_heads, eps, activation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def run_compiled(x: torch.Tensor, params: Sequence[BlockParams], num_heads: int, activation: str) -> torch.Tensor:
    """:func:`run_fused`'s arguments, as one call of the op (for a compiled graph)."""
    flat = [t for p in params for t in p.tensors()]
    return torch.ops.reid_ms.fused_blocks(x, flat, num_heads, params[0].eps, activation)
