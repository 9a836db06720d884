"""Multi-head self-attention from the stacked q/k/v product, one image at a time where that is faster.

Both backbones' attention starts from one product ``qkv = x @ W_qkv.T + b`` of shape ``[B, T, 3D]`` (q,
k and v side by side, each split into heads) and ends in ``[B, T, D]`` (heads side by side again).
:func:`self_attention` computes ``softmax(q k^T / sqrt(head_dim)) v`` between those layouts.

**Training on CPU in fp32** (where :func:`reid_ms.dispatch.attention_path` says so: short sequences,
2-4 threads), it runs :class:`PerImageAttention`: the forward is
:func:`explicit_attention` (per image: ``baddbmm`` for the scaled scores, softmax in place, ``bmm``, on
strided views of ``qkv``, so no layout copies of the whole batch); like a flash kernel it keeps only
``qkv`` and the output for the backward, which per image recomputes the probabilities ``P`` by the same
operations and then forms

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = dS K / sqrt(hd),   dK = dS^T Q / sqrt(hd)

(``rowsum(dO * O)`` equals the softmax backward's ``rowsum(dP * P)``), written straight into the
gradient of ``qkv``. One image's ``[heads, T, T]`` scores (2 MB for ViT-B at 211 tokens) stay in cache;
``docs/performance.md`` has the measurements against PyTorch's CPU flash kernel.

**Everywhere else** (no gradient needed, GPU, half precision, autocast, longer sequences, other thread
counts, attention dropout, ``torch.compile``/``torch.export``/ONNX/tracing, ``torch.func`` transforms) it
is ``F.scaled_dot_product_attention`` on permuted views, the path compilers and exporters know. (CPU fp32
*inference* has its own path in :mod:`reid_ms.kernels.blocks`, which calls :func:`explicit_attention`
for short sequences too.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from reid_ms.dispatch import attention_path


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention one image at a time: ``q``, ``k``, ``v`` ``[B, heads, T, hd]`` (any strides) ->
    ``[B, T, heads, hd]``.

    The scores and per-head outputs of one image are two buffers reused for every image.
    """
    b, heads, t, head_dim = q.shape
    out = q.new_empty(b, t, heads, head_dim)
    scores = q.new_empty(heads, t, t)
    heads_out = q.new_empty(heads, t, head_dim)
    for i in range(b):
        torch.baddbmm(scores, q[i], k[i].transpose(1, 2), beta=0, alpha=head_dim**-0.5, out=scores)
        torch.softmax(scores, -1, out=scores)
        torch.bmm(scores, v[i], out=heads_out)
        out[i].copy_(heads_out.transpose(0, 1))
    return out


def _split(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, T, 3D]`` -> views q, k, v ``[B, heads, T, hd]``."""
    b, t, three_d = qkv.shape
    q, k, v = qkv.reshape(b, t, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


class PerImageAttention(torch.autograd.Function):
    """``qkv`` ``[B, T, 3D]`` (contiguous) -> attention output ``[B, T, D]``; the backward of the module docstring."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, three_d = qkv.shape
        out = explicit_attention(*_split(qkv, heads)).view(b, t, three_d // 3)
        ctx.save_for_backward(qkv, out)
        ctx.heads = heads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, out = ctx.saved_tensors
        b, t, three_d = qkv.shape
        heads = ctx.heads
        head_dim = three_d // (3 * heads)
        scale = head_dim**-0.5
        q, k, v = _split(qkv, heads)
        grad_qkv = torch.empty_like(qkv)
        grad_q, grad_k, grad_v = _split(grad_qkv, heads)
        grad_out = grad_out.reshape(b, t, heads, head_dim)
        # rowsum(dO * O) for every image, head and query: [B, heads, T, 1]
        correction = (grad_out * out.view(b, t, heads, head_dim)).sum(-1).transpose(1, 2).unsqueeze(-1)
        grad_out = grad_out.transpose(1, 2)  # [B, heads, T, hd] view
        probs = qkv.new_empty(heads, t, t)
        grad_scores = qkv.new_empty(heads, t, t)
        heads_grad = qkv.new_empty(heads, t, head_dim)
        for i in range(b):
            # the forward's probabilities again, by the same operations
            torch.baddbmm(probs, q[i], k[i].transpose(1, 2), beta=0, alpha=scale, out=probs)
            torch.softmax(probs, -1, out=probs)
            torch.bmm(probs.transpose(1, 2), grad_out[i], out=heads_grad)
            grad_v[i].copy_(heads_grad)
            torch.bmm(grad_out[i], v[i].transpose(1, 2), out=grad_scores)
            grad_scores.sub_(correction[i]).mul_(probs)
            torch.baddbmm(heads_grad, grad_scores, k[i], beta=0, alpha=scale, out=heads_grad)
            grad_q[i].copy_(heads_grad)
            torch.baddbmm(heads_grad, grad_scores.transpose(1, 2), q[i], beta=0, alpha=scale, out=heads_grad)
            grad_k[i].copy_(heads_grad)
        return grad_qkv, None


def self_attention(qkv: torch.Tensor, heads: int, dropout_p: float = 0.0) -> torch.Tensor:
    """Multi-head softmax attention: ``qkv`` ``[B, T, 3D]`` (q, k, v stacked, heads inside each) -> ``[B, T, D]``.

    ``dropout_p`` drops attention probabilities (pass 0 outside training); it always takes SDPA.
    """
    b, t, three_d = qkv.shape
    if attention_path(qkv, dropout_p)[0] == "per_image":
        return PerImageAttention.apply(qkv.contiguous(), heads)
    x = F.scaled_dot_product_attention(*_split(qkv, heads), dropout_p=dropout_p)
    return x.transpose(1, 2).reshape(b, t, three_d // 3)
