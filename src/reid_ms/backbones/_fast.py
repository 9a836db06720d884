"""CPU inference fast path of the transformer block: packed-weight matrix products, few extra passes.

Both backbones run the same pre-norm block, ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``. In
inference on CPU (eval mode, no autograd, fp32) this module runs it with its own kernels choice:

- **Matrix products through MKL with packed weights** (``torch.ops.mkl._mkl_linear``, the kernel that
  PyTorch's own compiler emits for frozen fp32 linear layers): each block weight is reordered once into
  MKL's packed layout for the current number of rows and kept in a :class:`PackedWeights` cache on the
  backbone, so every later call skips the per-call packing that ``addmm`` and oneDNN's unpacked kernels
  redo. Measured on ViT-B's four layer shapes: 99-105 % of the ``2048 x 2048`` matmul peak from 129 to
  2064 rows, against 90-97 % for oneDNN's unpacked kernel. The bias is added inside the product; the
  activation (in place) and the residual addition (into the fresh product) are one pass each.
- **Large batches in chunks**: beyond :data:`CHUNK_ROWS` tokens, the batch runs through all blocks a
  few images at a time (the packed products fall to 84-90 % of the peak at 4000+ rows).
- **Without MKL** (ARM builds), ``torch.ops.mkldnn._linear_pointwise`` with the bias, GELU/swish or
  residual fused into oneDNN's product.

The packed copies take about as much memory as the block weights (340 MB for ViT-B/16). They are
rebuilt when a weight's storage or version counter changes (``load_state_dict``, optimiser steps, any
in-place update under ``torch.no_grad()``, ``.to()``) or the chunk's row count changes, and freed by
``train()`` and ``set_fused_inference(False)``. A write through ``weight.data`` bypasses the version
counter: call ``set_fused_inference(True)`` again after one (it clears the cache).

Attention reads strided views of the stacked q/k/v product without a copy. Up to
:data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens it runs explicitly, one image at a time
(:func:`reid_ms.backbones._attention.explicit_attention`: ``baddbmm`` with the scale, softmax in place,
``bmm``), so that the ``[heads, T, T]`` scores stay in cache; this beats
``F.scaled_dot_product_attention``'s CPU flash kernel at these lengths with 2 threads (not with 1; the
thread counts it is used at are :data:`reid_ms.backbones._attention.PER_IMAGE_THREADS`). Longer
sequences and other thread counts use that kernel, whose output transposed back is contiguous.

Measured in ``docs/performance.md``; outputs agree with the module path within float rounding
(``tests/test_fast_path.py``).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from reid_ms.backbones._attention import explicit_attention, per_image_threads
from reid_ms.backbones._common import eager_cpu_fp32

# CLIP's QuickGELU: y * sigmoid(1.702 * y)
QUICK_GELU_SCALE = 1.702

# Longest sequence attended explicitly image by image; longer ones go to SDPA's flash kernel. Measured on
# ViT-B (12 heads of 64), 2 threads: explicit 0.65-0.73x SDPA's time at 129 and 161 tokens, a tie at
# 211-321 (docs/performance.md), where SDPA needs no [heads, T, T] buffer.
EXPLICIT_ATTENTION_MAX_TOKENS = 192

# Most tokens (rows of the matrix products) per chunk of a fused inference batch: the packed products
# hold 99-105 % of the matmul peak up to about 2000 rows and fall to 84-90 % at 4000-8000 (ViT-B shapes,
# 2 threads; docs/performance.md).
CHUNK_ROWS = 2048


def mkl_packing_available() -> bool:
    """Whether this PyTorch build has MKL's packed linear kernels (x86 builds; not ARM)."""
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


# the fused path's matrix products: MKL with packed weights where this build has it, else oneDNN
USE_MKL_PACKING = mkl_packing_available()


class PackedWeights:
    """MKL-packed copies of a backbone's block weights for the fused inference path, built on first use.

    One copy per weight, packed for one row count (MKL's packed product requires that exact count):
    :attr:`rows` is the row count of a full chunk, whose copies are kept; a differing (last, smaller)
    chunk packs on the fly without replacing them. An entry is used only while the weight object, its
    storage and its version counter are the ones it was packed from. Never saved: pickling or deep-copying
    a model gives an empty cache. :attr:`token` names the cache for compiled graphs
    (:func:`PackedWeights.by_token`), which cannot hold Python objects.
    """

    _tokens = itertools.count()
    _by_token: weakref.WeakValueDictionary[int, PackedWeights] = weakref.WeakValueDictionary()

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, tuple[int, int, int], torch.Tensor]] = {}
        self.rows = 0
        self.token = next(PackedWeights._tokens)
        PackedWeights._by_token[self.token] = self

    @classmethod
    def by_token(cls, token: int) -> PackedWeights:
        """The live cache with this token, or a fresh one (its model is gone: nothing to keep)."""
        packs = cls._by_token.get(token)
        return packs if packs is not None else PackedWeights()

    def packed(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """``weight`` ``[N, K]`` packed for products with ``rows`` rows."""
        if weight.is_inference():  # no version counter to validate a copy against: pack every call
            return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        stamp = (weight.data_ptr(), weight._version, rows)
        entry = self._entries.get(id(weight))
        if entry is not None and entry[0]() is weight and entry[1] == stamp:
            return entry[2]
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        if rows == self.rows:
            # copies of weights that no longer exist (blocks removed or replaced) go with this one's update
            for key in [k for k, (ref, _, _) in self._entries.items() if ref() is None]:
                del self._entries[key]
            self._entries[id(weight)] = (weakref.ref(weight), stamp, packed)
        return packed

    def clear(self) -> None:
        """Drop every packed copy (frees their memory)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __deepcopy__(self, memo: dict) -> PackedWeights:
        return PackedWeights()

    def __repr__(self) -> str:
        return f"PackedWeights({len(self)} weights, rows={self.rows})"


def run_chunked(x: torch.Tensor, packs: PackedWeights | None, run: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
    """``run`` over ``x`` ``[B, T, D]`` in equal chunks of whole images, at most :data:`CHUNK_ROWS` tokens
    each where an image allows; sets ``packs.rows`` to a full chunk's token count."""
    b, t = x.shape[:2]
    per = max(1, math.ceil(b / max(1, math.ceil(b * t / CHUNK_ROWS))))
    if packs is not None:
        packs.rows = per * t
    if per >= b:
        return run(x)
    return torch.cat([run(chunk) for chunk in x.split(per)])


def run_fused(x: torch.Tensor, layers: list[tuple], num_heads: int, activation: str,
              packs: PackedWeights) -> torch.Tensor:
    """Blocks on ``x`` ``[B, T, D]`` through :func:`fused_block`, a chunk of images at a time.

    ``layers`` holds per block ``(norm1, qkv_weight, qkv_bias, proj, norm2, fc1, fc2)`` (modules, or
    objects with their ``weight`` / ``bias`` / ``eps``); ``packs`` is the backbone's cache, used where
    this build has MKL's packed kernels (else oneDNN's fused ones).
    """
    packs = packs if USE_MKL_PACKING else None

    def run(t: torch.Tensor) -> torch.Tensor:
        for norm1, qkv_weight, qkv_bias, proj, norm2, fc1, fc2 in layers:
            t = fused_block(t, norm1, (qkv_weight, qkv_bias), proj, num_heads, norm2, fc1, fc2, activation, packs)
        return t

    return run_chunked(x, packs, run)


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
    return (
        eager_cpu_fp32(x) and not torch.is_grad_enabled()
        and type(weight) is nn.Parameter and weight.device.type == "cpu" and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
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


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packs: PackedWeights | None,
             residual: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
    """``activation(x @ W.T + b)`` or ``x @ W.T + b + residual``; ``x`` ``[M, K]``.

    With ``packs``: MKL's product with the packed weight, then the activation in place or the residual
    added into the fresh product. Without: one oneDNN call with the epilogue fused.
    """
    if packs is None:
        return linear_onednn(x, (weight, bias), residual, activation)
    rows = x.shape[0]
    y = torch.ops.mkl._mkl_linear(x, packs.packed(weight, rows), weight, bias, rows)
    if residual is not None:
        return y.add_(residual)
    if activation == "gelu":
        return torch.ops.aten.gelu_(y)
    if activation == "swish":
        return F.silu(y, inplace=True)
    return y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention: ``q``, ``k``, ``v`` ``[B, heads, T, head_dim]`` (any strides) -> ``[B, T, heads, head_dim]``.

    Up to :data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens explicitly, one image at a time (at the thread counts
    of :data:`reid_ms.backbones._attention.PER_IMAGE_THREADS`); beyond, or at other thread counts, SDPA.
    """
    b, heads, t, head_dim = q.shape
    if t > EXPLICIT_ATTENTION_MAX_TOKENS or not per_image_threads():
        # [B, heads, T, head_dim] with the strides of [B, T, heads, head_dim]: transposing back is free
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return explicit_attention(q, k, v)


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
    packs: PackedWeights | None = None,
) -> torch.Tensor:
    """One pre-norm transformer block on ``x`` ``[B, T, D]`` -> ``[B, T, D]`` (inference, CPU, fp32).

    ``qkv`` is the stacked q/k/v projection (weight ``[3D, D]``, bias ``[3D]``), ``activation`` the
    MLP's: ``"gelu"`` (exact erf) or ``"quick_gelu"``; ``packs`` the backbone's packed-weight cache (None:
    oneDNN's fused kernels). ``x`` is not modified. QuickGELU runs as ``swish`` (``z * sigmoid(z)``, one
    in-place pass or oneDNN's post-op, neither of which takes a scale), so the scale moves to the inputs:
    ``swish(1.702 y) = 1.702 * quick_gelu(y)``, where ``1.702 y`` comes from scaling ``ln_2``'s affine
    parameters and ``c_fc``'s bias (vectors, not the weight), and the second MLP layer's output is
    divided by 1.702 again in the residual addition (with its bias scaled up first).
    """
    b, t, d = x.shape
    x = x.contiguous().view(b * t, d)
    h = F.layer_norm(x, (d,), norm1.weight, norm1.bias, norm1.eps)
    q, k, v = _project(h, *qkv, packs).view(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = attention(q, k, v).reshape(b * t, d)
    x = _project(attn, proj.weight, proj.bias, packs, residual=x)
    if activation == "gelu":
        h = F.layer_norm(x, (d,), norm2.weight, norm2.bias, norm2.eps)
        h = _project(h, fc1.weight, fc1.bias, packs, activation="gelu")
        x = _project(h, fc2.weight, fc2.bias, packs, residual=x)
    else:
        s = QUICK_GELU_SCALE
        h = F.layer_norm(x, (d,), norm2.weight * s, norm2.bias * s, norm2.eps)
        h = _project(h, fc1.weight, fc1.bias * s, packs, activation="swish")
        x = x.add(_project(h, fc2.weight, fc2.bias * s, packs), alpha=1 / s)
    return x.view(b, t, d)
