"""Multi-scale sliding-window neck: pooled window responses of the patch grid added to the CLS token.

For each scale ``s`` a ``s x s`` window slides over the ``H x W`` patch grid with stride ``s``; each
window map is global-average-pooled, the pooled vectors are averaged over the scales and added to the
CLS token. Patch tokens pass through unchanged.

Padding rule: the grid is zero-padded at the bottom and the right to the next multiple of ``s``
(``Hp = ceil(H / s) * s``, likewise ``Wp``), the window runs over the padded grid and the global average
covers all ``(Hp / s) * (Wp / s)`` windows, the partly padded ones included. Every patch token therefore
reaches the CLS, nothing is cropped, and a window larger than the grid still works (one window). The
zeros dilute the average: a 21 x 10 grid at ``s = 4`` is padded to 24 x 12, and the pooled response
divides by its 6 * 3 = 18 windows although the patches fill only 210 / 16 = 13.1 windows' worth.

Why forward never runs a convolution: a stride-``s`` window followed by a global average is linear, so
it equals the window's weights applied once to the mean of the padded grid's ``s x s`` tiles, plus the
bias. Dense mode: the tile sums ``[B, s, s, D]`` take a few block additions and the window becomes one
matrix product with the weight viewed as ``[D_out, D * s * s]``; written as three convolutions, the
dense neck (768 wide, scales 4/8/16) would cost about as much as the backbone, as matrix products it is
bound by reading its weights once. Light mode: the depthwise weights are small, so they are spread over
the grid instead (each patch takes the weight of its position in its window) and all scales are applied
with one product and sum. The ``nn.Conv2d`` modules stay as parameter holders, so the state-dict keys
are those of the convolutional definition (``windows.{i}.weight`` / ``.bias``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from reid_ms._validate import positive_int
from reid_ms.dispatch import fused_kernels_reason
from reid_ms.errors import ConfigError, InputError
from reid_ms.kernels.blocks import linear_onednn

MODES = ("dense", "light")
Windows = list[tuple[int, torch.Tensor, torch.Tensor]]  # (s, weight, bias) of each scale's window


def _check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    if isinstance(scales, (int, str)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ConfigError(f"scales must be a non-empty sequence of positive ints, e.g. (4, 8, 16), got {scales!r}")
    for s in scales:
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ConfigError(f"scales must hold positive ints (window sides in patches), got {tuple(scales)!r}")
    return tuple(int(s) for s in scales)


def _check_grid(grid_size: Sequence[int], owner: str) -> tuple[int, int]:
    if (not isinstance(grid_size, Sequence) or len(grid_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in grid_size)):
        raise InputError(f"{owner} expects grid_size=(H, W), two positive ints (the backbone's grid_size), "
                         f"got {grid_size!r}")
    return int(grid_size[0]), int(grid_size[1])


def window_count(h: int, w: int, scale: int) -> int:
    """Windows of side ``scale`` on the zero-padded ``h x w`` grid: ``ceil(h / s) * ceil(w / s)``."""
    return math.ceil(h / scale) * math.ceil(w / scale)


def tile_sum(grid: torch.Tensor, scale: int) -> torch.Tensor:
    """Sum of the ``scale x scale`` tiles of the zero-padded grid: ``[B, H, W, D] -> [B, s, s, D]``.

    Divided by :func:`window_count` it is the tile mean of the padding rule.
    """
    b, h, w, d = grid.shape
    # Blocks are added into s-sized buffers whose unfilled part is the zero padding, so the padded grid is
    # never built (padding, reshaping to [B, nh, s, nw, s, D] and summing two strided dims is several times
    # slower on CPU).
    rows = grid.new_zeros(b, scale, w, d)
    for top in range(0, h, scale):
        block = grid[:, top:top + scale]
        rows[:, :block.shape[1]] += block
    tiles = grid.new_zeros(b, scale, scale, d)
    for left in range(0, w, scale):
        block = rows[:, :, left:left + scale]
        tiles[:, :, :block.shape[2]] += block
    return tiles


def tile_position(h: int, w: int, scale: int, device: torch.device) -> torch.Tensor:
    """Position ``p * s + q`` inside its window of every patch of the ``h x w`` grid, row-major: ``[h * w]``."""
    rows = torch.arange(h, device=device) % scale
    cols = torch.arange(w, device=device) % scale
    return (rows[:, None] * scale + cols[None, :]).flatten()


class MultiScaleSlidingWindow(nn.Module):
    """Adds multi-scale sliding-window context from the patch grid to the CLS token.

    Args:
        feat_dim: token width ``D``.
        scales: window sides in patches; each window slides with a stride equal to its side.
        mode: ``"dense"``: per scale a full window ``nn.Conv2d(D, D, s, stride=s)`` (``D * D * s * s + D``
            parameters). ``"light"``: per scale a depthwise window ``nn.Conv2d(D, D, s, stride=s,
            groups=D)``, then one pointwise ``nn.Linear(D, D)`` shared by the scales, applied once to
            the mean of the depthwise responses (it is affine, so projecting the mean equals the mean
            of the projections).

    Initialisation: the layer that writes into the CLS starts at zero (the dense windows, the light
    pointwise projection; PyTorch's default initialisation for the light depthwise windows), so a
    fresh neck on a pretrained backbone first returns the backbone's CLS unchanged and training grows
    the multi-scale term from there instead of starting from a randomly shifted embedding. The zero
    layer still gets a gradient at the first step (its input is not zero); in light mode the depthwise
    windows get theirs once the pointwise projection has moved off zero, as the first factor of a
    zero-initialised low-rank adapter does.
    """

    def __init__(self, feat_dim: int, scales: Sequence[int] = (4, 8, 16), *, mode: str = "dense") -> None:
        super().__init__()
        positive_int(feat_dim, "feat_dim", owner="MultiScaleSlidingWindow")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
        self.feat_dim = feat_dim
        self.scales = _check_scales(scales)
        self.mode = mode
        groups = 1 if mode == "dense" else feat_dim
        self.windows = nn.ModuleList(
            nn.Conv2d(feat_dim, feat_dim, s, stride=s, groups=groups) for s in self.scales
        )
        self.pointwise = nn.Linear(feat_dim, feat_dim) if mode == "light" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the layer writing into the CLS (see the class docstring); default init elsewhere."""
        if self.pointwise is not None:
            for window in self.windows:
                assert isinstance(window, nn.Conv2d)  # for the type checker: the windows are convolutions
                window.reset_parameters()
        for param in (self.windows if self.pointwise is None else self.pointwise).parameters():
            nn.init.zeros_(param)

    def _windows(self) -> Windows:
        """Weight ``[D, D, s, s]`` (light: ``[D, 1, s, s]``) and bias ``[D]`` of each scale's window."""
        return [(s, self.windows.get_parameter(f"{i}.weight"), self.windows.get_parameter(f"{i}.bias"))
                for i, s in enumerate(self.scales)]

    def _check(self, tokens: torch.Tensor, grid_size: Sequence[int]) -> tuple[int, int]:
        h, w = _check_grid(grid_size, type(self).__name__)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"{type(self).__name__} expects tokens [B, 1 + H*W, {self.feat_dim}], got {shape}")
        if tokens.shape[2] != self.feat_dim:
            raise InputError(f"{type(self).__name__} was built with feat_dim={self.feat_dim}, got tokens of "
                             f"width {tokens.shape[2]} (shape {tuple(tokens.shape)}); build it with "
                             f"feat_dim={tokens.shape[2]} or adapt the tokens with DimAdapter")
        if tokens.shape[1] != 1 + h * w:
            raise InputError(f"{type(self).__name__}: tokens of shape {tuple(tokens.shape)} do not fit "
                             f"grid_size=({h}, {w}): expected 1 + {h}*{w} = {1 + h * w} tokens (CLS first)")
        return h, w

    def context(self, tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        """The term added to the CLS token: ``[B, 1 + H*W, D] -> [B, D]``.

        Per scale the pooled window response (see the module docstring), then the mean over the scales;
        in light mode the shared pointwise projection of that mean.
        """
        h, w = self._check(tokens, grid_size)
        patches, windows = tokens[:, 1:], self._windows()
        bias = torch.stack([bias for _, _, bias in windows]).sum(0)
        if self.pointwise is None:
            grid = rearrange(patches, "b (h w) d -> b h w d", h=h)
            return (self._dense_context(grid, windows, h, w) + bias) / len(windows)
        return self.pointwise((self._depthwise_context(patches, windows, h, w) + bias) / len(windows))

    @staticmethod
    def _dense_context(grid: torch.Tensor, windows: Windows, h: int, w: int) -> torch.Tensor:
        # The weights are large, the grid small: pool the grid into one [s, s] tile map per scale and read
        # each weight once, as [D_out, D_in * s * s]; the small tile map is permuted to the weight's
        # (d, p, q) order, never the weight. weight @ tiles [K, B] streams the weight (x @ weight.T runs at
        # half that speed on CPU at small batches). In CPU inference oneDNN's tiles [B, K] @ weight.T reads
        # the weight at memory speed, faster than addmm at small batches (which has the derivative training
        # needs).
        b, d = grid.shape[0], grid.shape[3]
        onednn = fused_kernels_reason(grid, windows[0][1]) is None
        acc = grid.new_zeros(b, d) if onednn else grid.new_zeros(d, b)
        for s, weight, _ in windows:
            weight, count = weight.reshape(d, d * s * s), window_count(h, w, s)
            if onednn:
                tiles = tile_sum(grid, s).div_(count).permute(0, 3, 1, 2).reshape(b, d * s * s)
                acc = acc + linear_onednn(tiles, weight, None)
            else:
                tiles = tile_sum(grid, s).permute(3, 1, 2, 0).reshape(d * s * s, b)
                acc = torch.addmm(acc, weight, tiles, alpha=1 / count)
        return acc if onednn else acc.t()

    @staticmethod
    def _depthwise_context(patches: torch.Tensor, windows: Windows, h: int, w: int) -> torch.Tensor:
        # The weights are small, the grid large: spread each window's weights over the grid instead (each
        # patch takes the weight of its position inside its window, divided by the window count), sum the
        # scales' maps into one [H*W, D] map and apply it with a single product and sum.
        d = patches.shape[2]
        weight = sum(weight.reshape(d, s * s).t().index_select(0, tile_position(h, w, s, patches.device))
                     / window_count(h, w, s) for s, weight, _ in windows)  # [H*W, D]
        return (patches * weight).sum(1)

    def forward(self, tokens: torch.Tensor, grid_size: Sequence[int]) -> torch.Tensor:
        """``[B, 1 + H*W, D] -> [B, 1 + H*W, D]``: CLS plus :meth:`context`; patch tokens returned as is."""
        context = self.context(tokens, grid_size)
        return torch.cat([tokens[:, :1] + context.unsqueeze(1), tokens[:, 1:]], dim=1)

    def extra_repr(self) -> str:
        return f"feat_dim={self.feat_dim}, scales={self.scales}, mode={self.mode!r}"
