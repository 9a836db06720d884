"""CPU inference fast path of the transformer block: oneDNN linear layers with fused epilogues.

Both backbones run the same pre-norm block, ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``. In
inference on CPU this module runs it with ``torch.ops.mkldnn._linear_pointwise``, the oneDNN kernel
that PyTorch's own compiler (Inductor) emits for CPU linear layers:

- the bias is added inside the matrix product (aten's ``addmm`` first copies the broadcast bias into
  the output: one extra pass per layer);
- the activation is applied inside the product of the MLP's first layer (exact-erf GELU; CLIP's
  QuickGELU through the ``swish`` post-op, see :func:`fused_block`);
- the residual additions after the attention projection and the MLP are fused into those products
  (``binary`` ``add`` post-op).

The multi-scale neck's dense windows use :func:`linear_onednn` too (``necks/multiscale.py``).

Attention reads strided views of the stacked q/k/v product without a copy. Up to
:data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens it runs explicitly, one image at a time (``baddbmm`` with the
scale, softmax in place, ``bmm``), so that the ``[heads, T, T]`` scores stay in cache; this beats
``F.scaled_dot_product_attention``'s CPU flash kernel at these lengths. Longer sequences use that kernel,
whose output transposed back is contiguous.
Measured in ``docs/performance.md``; outputs agree with the module path within float rounding
(``tests/test_fast_path.py``). Weights are read as they are on every call (no prepacked copies), so
loading, optimiser steps and ``.to()`` need no cache invalidation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# CLIP's QuickGELU: y * sigmoid(1.702 * y)
QUICK_GELU_SCALE = 1.702

# Longest sequence attended explicitly image by image; longer ones go to SDPA's flash kernel. Measured on
# ViT-B (12 heads of 64), 2 threads: explicit 0.65-0.73x SDPA's time at 129 and 161 tokens, a tie at
# 211-321 (docs/performance.md), where SDPA needs no [heads, T, T] buffer.
EXPLICIT_ATTENTION_MAX_TOKENS = 192


def _hooked(blocks: nn.Module) -> bool:
    """Whether a forward hook would see the blocks' submodules run (the fused path calls none of them)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in blocks.modules())


def fused_kernels_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` may go through ``torch.ops.mkldnn._linear_pointwise``.

    Only plain fp32 CPU tensors with oneDNN enabled, no autograd graph being recorded (training and
    gradient-based uses keep aten's ops, which have derivatives), no autocast, and not under
    ``torch.compile``, ``torch.export``, ONNX export or ``torch.jit`` tracing: those trace the module
    path, whose graph their own backends fuse.
    """
    # tracing checks first: under torch.compile the first one is a constant and nothing else is traced
    return (
        not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
        and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()
        and not torch.is_grad_enabled()
        and type(x) is torch.Tensor  # no FakeTensor / functional / subclass tensors
        and x.device.type == "cpu" and x.dtype == torch.float32 and x.layout == torch.strided
        and type(weight) is nn.Parameter and weight.device.type == "cpu" and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def fast_path_active(x: torch.Tensor, module: nn.Module, blocks: nn.Module, weight: torch.Tensor) -> bool:
    """Whether ``module`` may run ``blocks`` through :func:`fused_block` on ``x``.

    With ``module.fused_inference`` on, ``module`` in eval mode (dropout and drop path off), no forward
    hook on the blocks or their layers (those would silently stop firing) and
    :func:`fused_kernels_usable`; ``weight`` is one of the block weights (its dtype and device decide too).
    """
    return (fused_kernels_usable(x, weight) and module.fused_inference and not module.training
            and not _hooked(blocks))


def linear_onednn(x: torch.Tensor, layer: nn.Linear | tuple[torch.Tensor, torch.Tensor | None],
                  residual: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
    """``activation(x @ W.T + b)`` or ``x @ W.T + b + residual`` as one oneDNN call; ``x`` ``[M, K]``."""
    weight, bias = (layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if activation == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [None], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, [], None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention: ``q``, ``k``, ``v`` ``[B, heads, T, head_dim]`` (any strides) -> ``[B, T, heads, head_dim]``.

    Up to :data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens explicitly, one image at a time; beyond, SDPA.
    """
    b, heads, t, head_dim = q.shape
    if t > EXPLICIT_ATTENTION_MAX_TOKENS:
        # [B, heads, T, head_dim] with the strides of [B, T, heads, head_dim]: transposing back is free
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    out = q.new_empty(b, t, heads, head_dim)
    # one image's scores and per-head outputs, reused: allocated once, small enough to stay in cache
    scores = q.new_empty(heads, t, t)
    heads_out = q.new_empty(heads, t, head_dim)
    for i in range(b):
        torch.baddbmm(scores, q[i], k[i].transpose(1, 2), beta=0, alpha=head_dim**-0.5, out=scores)
        torch.softmax(scores, -1, out=scores)
        torch.bmm(scores, v[i], out=heads_out)
        out[i].copy_(heads_out.transpose(0, 1))
    return out


def fused_block(
    x: torch.Tensor,
    norm1: nn.LayerNorm,
    qkv: tuple[torch.Tensor, torch.Tensor | None],
    proj: nn.Linear,
    num_heads: int,
    norm2: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    activation: str,
) -> torch.Tensor:
    """One pre-norm transformer block on ``x`` ``[B, T, D]`` -> ``[B, T, D]`` (inference, CPU, fp32).

    ``qkv`` is the stacked q/k/v projection (weight ``[3D, D]``, bias ``[3D]``), ``activation`` the
    MLP's: ``"gelu"`` (exact erf) or ``"quick_gelu"``. oneDNN has no QuickGELU post-op, and its
    ``swish`` (``z * sigmoid(z)``) takes no scale, so the scale moves to the inputs:
    ``swish(1.702 y) = 1.702 * quick_gelu(y)``, where ``1.702 y`` comes from scaling ``ln_2``'s affine
    parameters and ``c_fc``'s bias (vectors, not the weight), and the second MLP layer's output is
    divided by 1.702 again in the residual addition (with its bias scaled up first).
    """
    b, t, d = x.shape
    x = x.contiguous().view(b * t, d)
    h = F.layer_norm(x, (d,), norm1.weight, norm1.bias, norm1.eps)
    q, k, v = linear_onednn(h, qkv).view(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = attention(q, k, v).reshape(b * t, d)
    x = linear_onednn(attn, proj, residual=x)
    if activation == "gelu":
        h = linear_onednn(F.layer_norm(x, (d,), norm2.weight, norm2.bias, norm2.eps), fc1, activation="gelu")
        x = linear_onednn(h, fc2, residual=x)
    else:
        s = QUICK_GELU_SCALE
        h = F.layer_norm(x, (d,), norm2.weight * s, norm2.bias * s, norm2.eps)
        h = linear_onednn(h, (fc1.weight, fc1.bias * s), activation="swish")
        x = x.add(linear_onednn(h, (fc2.weight, fc2.bias * s)), alpha=1 / s)
    return x.view(b, t, d)
