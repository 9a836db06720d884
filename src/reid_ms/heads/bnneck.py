"""The BNNeck head of TransReID / CLIP-ReID (and fast-reid's embedding head)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from reid_ms._validate import positive_int
from reid_ms.errors import ConfigError, InputError

NECK_FEATS = ("before", "after")


def check_neck_feat(neck_feat: str) -> str:
    if neck_feat not in NECK_FEATS:
        raise ConfigError(f"neck_feat must be one of {NECK_FEATS}, got {neck_feat!r}")
    return neck_feat


def new_classifier(feat_dim: int, num_classes: int, like: torch.Tensor) -> Optional[nn.Linear]:
    """TransReID's bias-free classifier (weights ``N(0, 0.001^2)``) on ``like``'s device and dtype, or ``None``."""
    if num_classes == 0:
        return None
    classifier = nn.Linear(feat_dim, num_classes, bias=False, device=like.device, dtype=like.dtype)
    nn.init.normal_(classifier.weight, std=0.001)
    return classifier


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

    def __init__(self, feat_dim: int, *, num_classes: int = 0, neck_feat: str = "before") -> None:
        super().__init__()
        self.feat_dim = positive_int(feat_dim, "feat_dim", owner="BNNeckHead")
        self.neck_feat = check_neck_feat(neck_feat)
        self.bottleneck = nn.BatchNorm1d(feat_dim)
        # a shift before a bias-free classifier only moves every logit of a sample together; frozen at 0
        # as in the BNNeck paper, so the BatchNorm only normalises and scales
        self.bottleneck.bias.requires_grad_(False)
        self.reset_classifier(num_classes)

    def reset_parameters(self) -> None:
        self.bottleneck.reset_parameters()
        if self.classifier is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)

    @torch.jit.ignore
    def get_classifier(self) -> Optional[nn.Linear]:
        """The bias-free identity classifier ``Linear(D, num_classes)``, ``None`` without one."""
        return self.classifier

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for ``num_classes`` identities (0: none); the BatchNorm is kept."""
        self.num_classes = positive_int(num_classes, "num_classes", minimum=0, owner="BNNeckHead")
        self.classifier = new_classifier(self.feat_dim, num_classes, self.bottleneck.weight)

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
