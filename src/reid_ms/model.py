"""A re-ID model: backbone -> (width adapter) -> (neck) -> CLS -> BNNeck head."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from reid_ms.backbones._common import Label
from reid_ms.errors import ConfigError
from reid_ms.heads import BNNeckHead
from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow
from reid_ms.weights._common import LoadReport


class BuiltModel(nn.Module):
    """What every model :func:`~reid_ms.build` returns shares, whatever its structure.

    A backbone with a patch grid (``grid_size``, ``out_dim``), an optional width adapter, an optional
    neck as wide as the tokens reaching it, and the record of how ``build`` made it: ``model_name``
    and ``load_report`` (``None`` for a model assembled by hand).
    """

    def __init__(self, backbone: nn.Module, neck: Optional[MultiScaleSlidingWindow] = None,
                 adapter: Optional[DimAdapter] = None) -> None:
        super().__init__()
        owner = type(self).__name__
        for attr in ("grid_size", "out_dim"):
            if not hasattr(backbone, attr):
                raise ConfigError(f"{owner} needs a backbone with a {attr!r} attribute (like reid_ms.VitTrans "
                                  f"and reid_ms.ClipVisual); {type(backbone).__name__} has none")
        width: int = getattr(backbone, "out_dim")  # checked above; a Module attribute types as Tensor | Module
        if adapter is not None:
            if adapter.in_dim != width:
                raise ConfigError(f"the adapter takes {adapter.in_dim}-wide tokens but the backbone returns "
                                  f"{width}-wide ones; build DimAdapter(in_dim={width}, ...)")
            width = adapter.out_dim
        if neck is not None and neck.feat_dim != width:
            raise ConfigError(f"the neck is {neck.feat_dim} wide but the tokens reaching it are {width} wide; "
                              f"build MultiScaleSlidingWindow(feat_dim={width}, ...)")
        # Any, not nn.Module: which backbone depends on the registered name, and the family's loader
        # (load_vit_weights(model.backbone, path)) and its attributes (grid_size, img_size) must type-check
        self.backbone: Any = backbone
        self.adapter = adapter
        self.neck = neck
        self.token_dim: int = width
        self.model_name: Optional[str] = None
        self.load_report: Optional[LoadReport] = None

    @property
    def grid_size(self) -> tuple[int, int]:
        """The backbone's patch grid ``(H, W)``."""
        return tuple(self.backbone.grid_size)


class ReIDModel(BuiltModel):
    """Backbone, optional width adapter, optional neck and a BNNeck head, called like the backbone.

    ``forward(images, cam_label=None, view_label=None)``: the backbone returns every token
    ``[B, 1 + H*W, out_dim]``; the adapter (if any) projects them to the neck's width; the neck (if any)
    adds its multi-scale context to the CLS; the CLS goes through the head. Eval mode returns the
    embedding ``[B, feat_dim]``; train mode ``(logits [B, num_classes] or None, feature [B, feat_dim])``
    (see :class:`~reid_ms.BNNeckHead`).

    Args:
        backbone: any module with ``forward(images, cam_label, view_label) -> [B, 1 + H*W, out_dim]``
            and the attributes ``grid_size`` ``(H, W)`` and ``out_dim``.
        neck: a :class:`~reid_ms.MultiScaleSlidingWindow` of width ``feat_dim``, or ``None``.
        head: a :class:`~reid_ms.BNNeckHead` of width ``feat_dim``; ``None`` builds one without classifier.
        adapter: a :class:`~reid_ms.DimAdapter` from ``backbone.out_dim`` to the neck's width, or ``None``.

    Attributes:
        feat_dim: width of the embedding (the adapter's ``out_dim`` if there is one, else the backbone's).
        model_name: the registered name it was built from (:func:`~reid_ms.build`), else ``None``.
        load_report: the :class:`~reid_ms.LoadReport` of ``build(..., pretrained=path)``, else ``None``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: Optional[MultiScaleSlidingWindow] = None,
        head: Optional[BNNeckHead] = None,
        adapter: Optional[DimAdapter] = None,
    ) -> None:
        super().__init__(backbone, neck, adapter)
        width = self.token_dim
        head = BNNeckHead(width) if head is None else head
        if head.feat_dim != width:
            raise ConfigError(f"the head is {head.feat_dim} wide but the features reaching it are {width} wide; "
                              f"build BNNeckHead(feat_dim={width}, ...)")
        self.head = head
        self.feat_dim = width

    def forward_tokens(self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None) -> torch.Tensor:
        """Images ``[B, C, img_h, img_w]`` -> the neck-enhanced tokens ``[B, 1 + H*W, feat_dim]``."""
        tokens = self._tokens(images, cam_label, view_label)
        return tokens if self.neck is None else self.neck(tokens, self.grid_size)

    def forward_features(self, images: torch.Tensor, cam_label: Label = None,
                         view_label: Label = None) -> torch.Tensor:
        """Images -> the pooled feature ``[B, feat_dim]`` fed to the head (the neck-enhanced CLS)."""
        tokens = self._tokens(images, cam_label, view_label)
        cls = tokens[:, 0]
        if self.neck is not None:
            # only the CLS is used: add the neck's context without rebuilding the patch tokens
            cls = cls + self.neck.context(tokens, self.grid_size)
        return cls

    def forward(
        self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None,
    ) -> torch.Tensor | tuple[Optional[torch.Tensor], torch.Tensor]:
        """Eval: the embedding ``[B, feat_dim]``; train: ``(logits or None, feature [B, feat_dim])``."""
        return self.head(self.forward_features(images, cam_label, view_label))

    def _tokens(self, images: torch.Tensor, cam_label: Label, view_label: Label) -> torch.Tensor:
        tokens = self.backbone(images, cam_label=cam_label, view_label=view_label)
        return tokens if self.adapter is None else self.adapter(tokens)
