"""The fused CPU inference path of the pre-norm transformer block, and the packed weights it can use.

Both backbones run the same block, ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``. Where
:func:`reid_ms.dispatch.block_path` picks ``"fused"`` (inference, fp32 CPU), :func:`run_fused` runs the
blocks with few extra passes over the activations:

- **Matrix products through oneDNN** (``torch.ops.mkldnn._linear_pointwise``) with the bias, the GELU
  (or swish) and the residual addition fused into the product. These read the module's weights on every
  call: nothing is cached, so the result always follows the current weights, however they were changed.
- **With packed weights** (:class:`PackedWeights`, only inside a model made by
  :func:`reid_ms.optimize_for_inference`): MKL's product (``torch.ops.mkl._mkl_linear``, the kernel
  PyTorch's compiler emits for frozen fp32 linear layers) on weights reordered once into MKL's layout,
  which skips the per-call packing the unpacked kernels redo; the activation runs in place and the
  residual is added into the fresh product.
- **Large batches in chunks** of whole images, at most :data:`CHUNK_ROWS` tokens each.
- **Attention** on strided views of the stacked q/k/v product, without a copy: explicitly image by image
  for short sequences (:func:`reid_ms.kernels.attention.explicit_attention`), else SDPA, as
  :func:`reid_ms.dispatch.block_path` decided.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from reid_ms import dispatch
from reid_ms.errors import InferenceModelError
from reid_ms.kernels.attention import explicit_attention

# CLIP's QuickGELU: y * sigmoid(1.702 * y)
QUICK_GELU_SCALE = 1.702

# Most tokens (rows of the matrix products) per chunk of a fused inference batch: the products hold their
# speed up to about 2000 rows and lose some beyond (docs/performance.md).
CHUNK_ROWS = 2048

ACTIVATIONS = ("gelu", "quick_gelu")


class BlockParams(NamedTuple):
    """The tensors of one pre-norm block, in the order the compiled op takes them, and the norms' eps.

    ``qkv_weight`` ``[3D, D]`` stacks q, k and v; ``fc1`` is the MLP's first layer. Biases may be
    ``None`` (a layer built without one).
    """

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor | None
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor | None
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor | None
    eps: float

    def tensors(self) -> list[torch.Tensor | None]:
        """The twelve tensors, without ``eps``."""
        return list(self[:-1])


TENSORS_PER_BLOCK = len(BlockParams._fields) - 1


class PackedWeights:
    """MKL-packed copies of frozen weights for one row count, built on first use.

    MKL's packed product requires the exact row count it was packed for: :attr:`rows` is a full chunk's
    count, whose copies are kept; a differing (last, smaller) chunk packs on the fly. Each entry holds a
    strong reference to the tensor it was packed from, so no other tensor can take its address or
    identity, and its version counter: an in-place write to a frozen weight raises
    :class:`~reid_ms.errors.InferenceModelError` instead of computing with a stale copy.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[torch.Tensor, int, int, torch.Tensor]] = {}
        self.rows = 0

    def set_rows(self, rows: int) -> None:
        """Keep copies packed for ``rows`` rows from now on (drops those of another count)."""
        if rows != self.rows:
            self._entries.clear()
            self.rows = rows

    def packed(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        """``weight`` ``[N, K]`` packed for products with ``rows`` rows."""
        if rows != self.rows or weight.is_inference():  # inference tensors have no version counter
            return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        entry = self._entries.get(id(weight))
        if entry is None:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
            self._entries[id(weight)] = (weight, weight._version, weight.data_ptr(), packed)
            return packed
        source, version, address, packed = entry
        if source is not weight or weight._version != version or weight.data_ptr() != address:
            raise InferenceModelError(
                "a weight of a model made by reid_ms.optimize_for_inference was changed after it was frozen; "
                "change the original model and call optimize_for_inference(model) again")
        return packed

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"PackedWeights({len(self)} weights, rows={self.rows})"


_packs_in_use = threading.local()


@contextlib.contextmanager
def using_packed_weights(packs: Mapping[nn.Module, PackedWeights]) -> Iterator[None]:
    """Within the block, the fused path of each backbone in ``packs`` uses its packed weights (this thread)."""
    outer = getattr(_packs_in_use, "packs", None)
    _packs_in_use.packs = packs
    try:
        yield
    finally:
        _packs_in_use.packs = outer


def packed_weights_for(backbone: nn.Module) -> PackedWeights | None:
    """The packed weights of ``backbone`` in the :func:`using_packed_weights` block in progress, if any."""
    packs = getattr(_packs_in_use, "packs", None)
    return None if packs is None else packs.get(backbone)


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None = None, activation: str = "none") -> torch.Tensor:
    """``activation(x @ W.T + b)`` or ``x @ W.T + b + residual`` as one oneDNN call; ``x`` ``[M, K]``."""
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
        return linear_onednn(x, weight, bias, residual, activation)
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

    Explicitly, one image at a time, where :mod:`reid_ms.dispatch` uses that form (short sequences, its
    thread counts); else SDPA.
    """
    if dispatch.fused_attention_path(q.shape[2])[0] == "sdpa":
        # [B, heads, T, head_dim] with the strides of [B, T, heads, head_dim]: transposing back is free
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return explicit_attention(q, k, v)


def fused_block(x: torch.Tensor, p: BlockParams, num_heads: int, activation: str,
                packs: PackedWeights | None = None) -> torch.Tensor:
    """One pre-norm transformer block on ``x`` ``[B, T, D]`` -> ``[B, T, D]`` (inference, CPU, fp32).

    ``activation`` is the MLP's: ``"gelu"`` (exact erf) or ``"quick_gelu"``; ``packs`` packed weights
    (``None``: oneDNN's fused kernels on the weights as they are). ``x`` is not modified. QuickGELU runs
    as ``swish`` (``z * sigmoid(z)``, one in-place pass or oneDNN's post-op, neither of which takes a
    scale), so the scale moves to the inputs: ``swish(1.702 y) = 1.702 * quick_gelu(y)``, where ``1.702 y``
    comes from scaling ``ln_2``'s affine parameters and ``c_fc``'s bias (vectors, not the weight), and the
    second MLP layer's output is divided by 1.702 again in the residual addition (its bias scaled up first).
    """
    b, t, d = x.shape
    x = x.contiguous().view(b * t, d)
    h = F.layer_norm(x, (d,), p.norm1_weight, p.norm1_bias, p.eps)
    qkv = _project(h, p.qkv_weight, p.qkv_bias, packs)
    q, k, v = qkv.view(b, t, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    x = _project(attention(q, k, v).reshape(b * t, d), p.proj_weight, p.proj_bias, packs, residual=x)
    if activation == "gelu":
        h = F.layer_norm(x, (d,), p.norm2_weight, p.norm2_bias, p.eps)
        h = _project(h, p.fc1_weight, p.fc1_bias, packs, activation="gelu")
        x = _project(h, p.fc2_weight, p.fc2_bias, packs, residual=x)
    else:
        s = QUICK_GELU_SCALE
        h = F.layer_norm(x, (d,), p.norm2_weight * s, p.norm2_bias * s, p.eps)
        h = _project(h, p.fc1_weight, _scaled(p.fc1_bias, s), packs, activation="swish")
        x = x.add(_project(h, p.fc2_weight, _scaled(p.fc2_bias, s), packs), alpha=1 / s)
    return x.view(b, t, d)


def _scaled(bias: torch.Tensor | None, s: float) -> torch.Tensor | None:
    return None if bias is None else bias * s


def run_fused(x: torch.Tensor, params: Sequence[BlockParams], num_heads: int, activation: str,
              packs: PackedWeights | None = None) -> torch.Tensor:
    """The blocks on ``x`` ``[B, T, D]`` through :func:`fused_block`, in equal chunks of whole images of at
    most :data:`CHUNK_ROWS` tokens each where an image allows; ``packs`` as in :func:`fused_block`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    b, t = x.shape[:2]
    per = max(1, math.ceil(b / max(1, math.ceil(b * t / CHUNK_ROWS))))
    if packs is not None:
        packs.set_rows(per * t)

    def run(chunk: torch.Tensor) -> torch.Tensor:
        for p in params:
            chunk = fused_block(chunk, p, num_heads, activation, packs)
        return chunk

    if per >= b:
        return run(x)
    return torch.cat([run(chunk) for chunk in x.split(per)])
