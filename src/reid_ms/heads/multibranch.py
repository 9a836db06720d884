"""One BNNeck per branch (TransReID's JPM: the global feature and the local ones), as one head."""

from __future__ import annotations

from typing import Optional

import torch

from reid_ms._validate import positive_int
from reid_ms.heads.bnneck import BNNeckBase


class MultiBranchBNNeckHead(BNNeckBase):
    """A BNNeck for each of ``branches`` features of width ``branch_dim``, concatenated.

    The input is the branches' features side by side, ``[B, branches * branch_dim]``, the first one the
    global feature. The BatchNorms of the branches are held as one ``BatchNorm1d(branches * branch_dim)``
    (bias frozen at zero): BatchNorm works channel by channel, so this computes exactly what separate
    BatchNorms do (TransReID's ``bottleneck``, ``bottleneck_1`` ...) in one call. Each branch has its own
    bias-free classifier.

    Args:
        branch_dim: width ``D`` of one branch's feature.
        branches: number of branches ``K`` (TransReID's JPM: 1 global + 4 local).
        num_classes: identities of the training set; 0 builds no classifiers.
        neck_feat: the eval embedding is taken ``"before"`` (default) or ``"after"`` the BatchNorm.
        local_scale: factor on every branch but the first in the eval embedding (TransReID: 1 / 4).

    Returns:
        - train mode: ``(logits, features)``: ``logits`` a tuple of ``K`` tensors ``[B, num_classes]``
          (``None`` without classifiers), ``features`` a tuple of ``K`` tensors ``[B, D]`` taken before
          the BatchNorm, unscaled (TransReID's per-branch ID and triplet losses take these).
        - eval mode: ``[B, K * D]``: ``cat(f_0, local_scale * f_1, ..., local_scale * f_{K-1})`` of the
          features before or after the BatchNorm.

    Attributes:
        feat_dim: ``K * D``, the width of the eval embedding.
    """

    def __init__(self, branch_dim: int, branches: int, *, num_classes: int = 0, neck_feat: str = "before",
                 local_scale: float = 1.0) -> None:
        self.branch_dim = positive_int(branch_dim, "branch_dim", owner="MultiBranchBNNeckHead")
        self.branches = positive_int(branches, "branches", owner="MultiBranchBNNeckHead")
        self.local_scale = float(local_scale)
        super().__init__(branch_dim * branches, num_classes, neck_feat)

    def forward(self, feature: torch.Tensor) -> torch.Tensor | tuple[Optional[tuple[torch.Tensor, ...]],
                                                                     tuple[torch.Tensor, ...]]:
        """``[B, K * D]`` -> eval: ``[B, K * D]``; train: ``(logits per branch or None, features per branch)``."""
        self._check(feature, f"{self.branches} * {self.branch_dim}")
        if not self.training:
            out = self.bottleneck(feature) if self.neck_feat == "after" else feature
            d = self.branch_dim
            return torch.cat([out[:, :d], out[:, d:] * self.local_scale], dim=1)
        normed = self.bottleneck(feature).split(self.branch_dim, dim=1)
        logits = (tuple(classifier(x) for classifier, x in zip(self.classifiers, normed))
                  if self.classifiers is not None else None)
        return logits, feature.split(self.branch_dim, dim=1)

    def extra_repr(self) -> str:
        return (f"branch_dim={self.branch_dim}, branches={self.branches}, num_classes={self.num_classes}, "
                f"neck_feat={self.neck_feat!r}, local_scale={self.local_scale}")
