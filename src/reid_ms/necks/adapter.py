"""Per-token width adapter: lets a neck built for one width run on a backbone of another."""

from __future__ import annotations

import torch
from torch import nn

from reid_ms._validate import positive_int
from reid_ms.errors import InputError


class DimAdapter(nn.Module):
    """Projects every token from ``in_dim`` to ``out_dim``: ``[B, 1 + N, in_dim] -> [B, 1 + N, out_dim]``.

    A ``nn.Linear`` (optionally followed by a ``nn.LayerNorm``) applied to each token, CLS included.
    The weight starts (semi-)orthogonal with a zero bias: all its singular values are 1, so at
    initialisation the adapter neither shrinks nor inflates any direction of the backbone's features
    (going wider it is an isometry, ``|Wx| = |x|``; going narrower it keeps an orthonormal subspace).

    Args:
        in_dim: width of the incoming tokens.
        out_dim: width of the returned tokens.
        norm: add a ``LayerNorm(out_dim)`` after the projection.
    """

    def __init__(self, in_dim: int, out_dim: int, *, norm: bool = False) -> None:
        super().__init__()
        self.in_dim = positive_int(in_dim, "in_dim", owner="DimAdapter")
        self.out_dim = positive_int(out_dim, "out_dim", owner="DimAdapter")
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim) if norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.orthogonal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if isinstance(self.norm, nn.LayerNorm):
            self.norm.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + N, in_dim] -> [B, 1 + N, out_dim]``."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[2] != self.in_dim:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise InputError(f"DimAdapter expects tokens [B, 1 + N, {self.in_dim}], got {shape}")
        return self.norm(self.proj(tokens))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"
