"""The BNNeck head of TransReID / CLIP-ReID (and fast-reid's embedding head)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from reid_ms.errors import ConfigError, InputError

NECK_FEATS = ("before", "after")


class BNNeckHead(nn.Module):
    """BatchNorm bottleneck with an optional bias-free identity classifier.

    ``feature [B, D] -> BatchNorm1d (bias frozen at zero) -> Linear(D, num_classes, bias=False)``.
    The triplet loss sees the feature before the BatchNorm, the cross-entropy the logits after it
    (the BNNeck of Luo et al., used by TransReID and CLIP-ReID).

    Args:
        feat_dim: width ``D`` of the pooled feature.
        num_classes: identities of the training set; 0 builds no classifier.
        neck_feat: the eval embedding: ``"before"`` the BatchNorm (the TransReID / CLIP-ReID configs'
            choice, the default) or ``"after"`` it.

    Returns (the same rule in every mode, so ``logits, feature = head(x)`` always unpacks in training):
        - train mode: ``(logits [B, num_classes], feature [B, D])``, ``feature`` taken before the
          BatchNorm; ``logits`` is ``None`` when ``num_classes == 0``. The BatchNorm runs even without a
          classifier so its running statistics are ready for ``neck_feat="after"``.
        - eval mode: the embedding ``[B, D]``.

    Checkpoint keys follow TransReID's: ``bottleneck.*`` and ``classifier.weight``.
    """

    def __init__(self, feat_dim: int, num_classes: int = 0, neck_feat: str = "before") -> None:
        super().__init__()
        if not isinstance(feat_dim, int) or isinstance(feat_dim, bool) or feat_dim < 1:
            raise ConfigError(f"feat_dim must be a positive int, got {feat_dim!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise ConfigError(f"num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}")
        if neck_feat not in NECK_FEATS:
            raise ConfigError(f"neck_feat must be one of {NECK_FEATS}, got {neck_feat!r}")
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.neck_feat = neck_feat
        self.bottleneck = nn.BatchNorm1d(feat_dim)
        # a shift before a bias-free classifier only moves every logit of a sample together; frozen at 0
        # as in the BNNeck paper, so the BatchNorm only normalises and scales
        self.bottleneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False) if num_classes > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.bottleneck.reset_parameters()  # weight 1, bias 0, fresh running statistics
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feature: torch.Tensor) -> torch.Tensor | tuple[Optional[torch.Tensor], torch.Tensor]:
        """``[B, D]`` -> eval: ``[B, D]``; train: ``(logits [B, num_classes] or None, feature [B, D])``."""
        if not isinstance(feature, torch.Tensor) or feature.dim() != 2 or feature.shape[1] != self.feat_dim:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise InputError(f"BNNeckHead expects features [B, {self.feat_dim}], got {shape}")
        if self.training and feature.shape[0] < 2:
            raise InputError(f"BNNeckHead in train mode needs a batch of at least 2 (BatchNorm statistics), "
                             f"got {feature.shape[0]}; call model.eval() for inference")
        if not self.training:
            return self.bottleneck(feature) if self.neck_feat == "after" else feature
        normed = self.bottleneck(feature)
        logits = self.classifier(normed) if self.classifier is not None else None
        return logits, feature

    def extra_repr(self) -> str:
        return f"feat_dim={self.feat_dim}, num_classes={self.num_classes}, neck_feat={self.neck_feat!r}"
