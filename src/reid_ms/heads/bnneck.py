"""The BNNeck head of TransReID / CLIP-ReID (and fast-reid's embedding head)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from reid_ms._validate import positive_int
from reid_ms.errors import ConfigError, InputError

NECK_FEATS = ("before", "after")


class BNNeckBase(nn.Module):
    """What the BNNeck heads share: a ``BatchNorm1d(feat_dim)`` ``bottleneck`` with its bias frozen at zero,
    ``branches`` bias-free classifiers of ``feat_dim / branches`` inputs, and the input checks."""

    branches = 1

    def __init__(self, feat_dim: int, num_classes: int, neck_feat: str) -> None:
        super().__init__()
        if neck_feat not in NECK_FEATS:
            raise ConfigError(f"neck_feat must be one of {NECK_FEATS}, got {neck_feat!r}")
        self.feat_dim = feat_dim
        self.neck_feat = neck_feat
        self.bottleneck = nn.BatchNorm1d(feat_dim)
        # a shift before a bias-free classifier only moves every logit of a sample together; frozen at 0
        # as in the BNNeck paper, so the BatchNorm only normalises and scales
        self.bottleneck.bias.requires_grad_(False)
        self.reset_classifier(num_classes)

    @torch.jit.ignore
    def reset_parameters(self) -> None:
        self.bottleneck.reset_parameters()  # weight 1, bias 0, fresh running statistics
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.001)

    @torch.jit.ignore
    def get_classifier(self) -> Optional[nn.Module]:
        """The bias-free identity classifier(s), ``None`` without."""
        return getattr(self, "classifier", None) if self.branches == 1 else getattr(self, "classifiers", None)

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int) -> None:
        """Fresh classifier(s) for ``num_classes`` identities (0: none), weights ``N(0, 0.001^2)``; the
        BatchNorm is kept."""
        self.num_classes = positive_int(num_classes, "num_classes", minimum=0, owner=type(self).__name__)
        like = self.bottleneck.weight
        layers = [nn.Linear(self.feat_dim // self.branches, num_classes, bias=False, device=like.device,
                            dtype=like.dtype) for _ in range(self.branches if num_classes > 0 else 0)]
        if self.branches == 1:
            self.classifier = layers[0] if layers else None
        else:
            self.classifiers = nn.ModuleList(layers) if layers else None
        for layer in layers:
            nn.init.normal_(layer.weight, std=0.001)  # TransReID's

    def _check(self, feature: torch.Tensor, expected: str) -> None:
        owner = type(self).__name__
        if not isinstance(feature, torch.Tensor) or feature.dim() != 2 or feature.shape[1] != self.feat_dim:
            shape = tuple(feature.shape) if isinstance(feature, torch.Tensor) else type(feature).__name__
            raise InputError(f"{owner} expects features [B, {expected}], got {shape}")
        if self.training and feature.shape[0] < 2:
            raise InputError(f"{owner} in train mode needs a batch of at least 2 (BatchNorm statistics), "
                             f"got {feature.shape[0]}; call model.eval() for inference")


class BNNeckHead(BNNeckBase):
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
        super().__init__(positive_int(feat_dim, "feat_dim", owner="BNNeckHead"), num_classes, neck_feat)

    def forward(self, feature: torch.Tensor) -> torch.Tensor | tuple[Optional[torch.Tensor], torch.Tensor]:
        """``[B, D]`` -> eval: ``[B, D]``; train: ``(logits [B, num_classes] or None, feature [B, D])``."""
        self._check(feature, str(self.feat_dim))
        if not self.training:
            return self.bottleneck(feature) if self.neck_feat == "after" else feature
        normed = self.bottleneck(feature)
        logits = self.classifier(normed) if self.classifier is not None else None
        return logits, feature

    def extra_repr(self) -> str:
        return f"feat_dim={self.feat_dim}, num_classes={self.num_classes}, neck_feat={self.neck_feat!r}"
