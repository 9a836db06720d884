"""What every built model shares, in timm's shape: ``forward = forward_head(forward_features(...))``.

``forward_features(inputs, cam_label=None, view_label=None)`` returns tokens after the neck,
``forward_head(tokens, pre_logits=False)`` pools them and applies the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn

from reid_ms.backbones._common import Label
from reid_ms.errors import ConfigError
from reid_ms.heads.bnneck import BNNeckBase, BNNeckHead
from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow
from reid_ms.preprocess import input_config
from reid_ms.weights._common import LoadReport

LABELS = ("cam_label", "view_label")


def label_counts(backbone: nn.Module) -> dict[str, int]:
    """``{"cam_label": camera_num, "view_label": view_num}`` for the tables ``backbone`` has."""
    counts = dict(zip(LABELS, (getattr(backbone, "camera_num", 0), getattr(backbone, "view_num", 0))))
    return {name: n for name, n in counts.items() if n > 0}


def label_inputs(backbone: nn.Module, cams: torch.Tensor, views: torch.Tensor,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """``cam_label`` / ``view_label`` ``[B]`` on ``device`` for the tables ``backbone`` has (a model without a
    table rejects its label)."""
    return {name: t.to(device) for name, t in zip(LABELS, (cams, views)) if name in label_counts(backbone)}


def random_inputs(backbone: nn.Module, image_names: tuple[str, ...], batch: int,
                  generator: Optional[torch.Generator], device: torch.device) -> dict[str, torch.Tensor]:
    """Random images ``[batch, C, img_h, img_w]`` under each of ``image_names`` and in-range labels ``[batch]``."""
    shape = input_config(backbone)["input_size"]  # a ConfigError without img_size and in_chans
    inputs = {name: torch.randn(batch, *shape, generator=generator) for name in image_names}
    for name, count in label_counts(backbone).items():
        inputs[name] = torch.randint(0, count, (batch,), generator=generator)
    # drawn on the CPU (so a seed gives the same inputs everywhere), then moved to the model
    return {name: t.to(device) for name, t in inputs.items()}


def pack_call(image_names: tuple[str, ...], inputs: dict[str, torch.Tensor]) -> tuple[tuple[Any], dict[str, Any]]:
    """Inputs by name -> ``((images,), labels)``: one tensor under ``"images"``, else a dict by image name."""
    images = inputs["images"] if image_names == ("images",) else {name: inputs[name] for name in image_names}
    return (images,), {name: inputs[name] for name in LABELS if name in inputs}


def _backbone_switch(name: str, doc: str) -> Callable[..., None]:
    """A model method calling the backbone's switch ``name(enable)``."""

    def switch(self: BuiltModel, enable: bool = True) -> None:
        method = getattr(self.backbone, name, None)
        if method is None:
            raise ConfigError(f"{type(self.backbone).__name__} has no {name}(); this backbone has no such switch")
        method(enable)

    switch.__name__ = switch.__qualname__ = name
    switch.__doc__ = doc
    return torch.jit.ignore(switch)


class BuiltModel(nn.Module):
    """What every model :func:`~reid_ms.build` returns shares: a backbone with ``grid_size`` and ``out_dim``,
    an optional width adapter, an optional neck as wide as the tokens reaching it, a head (set by the
    subclass), ``model_name`` and ``load_report`` (``None`` for a model assembled by hand).

    Subclasses with another structure override ``forward_features`` (inputs -> tokens after the neck) and
    ``pool`` (those tokens -> the feature ``[B, feat_dim]`` the head takes).
    """

    head: BNNeckBase
    pretrained_cfg: dict[str, Any]  # set by build(): the input configuration (reid_ms.preprocess.input_config)
    image_names: tuple[str, ...] = ("images",)  # graph input names of the images

    def __init__(self, backbone: nn.Module, neck: Optional[MultiScaleSlidingWindow] = None, *,
                 adapter: Optional[DimAdapter] = None) -> None:
        super().__init__()
        for attr in ("grid_size", "out_dim"):
            if not hasattr(backbone, attr):
                raise ConfigError(f"{type(self).__name__} needs a backbone with a {attr!r} attribute (like "
                                  f"reid_ms.VitTrans and reid_ms.ClipVisual); {type(backbone).__name__} has none")
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
        self.adapter, self.neck = adapter, neck
        self.token_dim: int = width
        self.model_name: Optional[str] = None
        self.load_report: Optional[LoadReport] = None

    @property
    def grid_size(self) -> tuple[int, int]:
        """The backbone's patch grid ``(H, W)``."""
        return tuple(self.backbone.grid_size)

    @property
    def feat_dim(self) -> int:
        """Width of the embedding (the head's)."""
        return self.head.feat_dim

    num_features = feat_dim  # timm's name: the width of forward_head(..., pre_logits=True)

    @property
    def num_classes(self) -> int:
        """Identities the classifier scores (0: none)."""
        return self.head.num_classes

    def tokens(self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None) -> torch.Tensor:
        """Images ``[B, C, img_h, img_w]`` -> backbone tokens, through the adapter: ``[B, 1 + H*W, token_dim]``."""
        tokens = self.backbone(images, cam_label=cam_label, view_label=view_label)
        return tokens if self.adapter is None else self.adapter(tokens)

    def with_neck(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, 1 + H*W, token_dim]`` with the neck's context added to the CLS (no neck: as they are)."""
        return tokens if self.neck is None else self.neck(tokens, self.grid_size)

    def forward_features(self, images: Any, cam_label: Label = None, view_label: Label = None) -> Any:
        """Images ``[B, C, img_h, img_w]`` -> every token after the neck ``[B, 1 + H*W, token_dim]``, CLS first."""
        return self.with_neck(self.tokens(images, cam_label, view_label))

    def pool(self, tokens: Any) -> torch.Tensor:
        """Tokens from :meth:`forward_features` -> the feature the head takes: the CLS ``[B, token_dim]``."""
        return tokens[:, 0]

    def forward_head(self, tokens: Any, pre_logits: bool = False) -> Any:
        """Tokens from :meth:`forward_features` -> the pooled feature ``[B, feat_dim]`` (``pre_logits``) or
        the head's output (eval: the embedding ``[B, feat_dim]``; train: ``(logits, feature)``)."""
        feature = self.pool(tokens)
        return feature if pre_logits else self.head(feature)

    def forward(self, images: Any, cam_label: Label = None, view_label: Label = None) -> Any:
        """Eval: the embedding ``[B, feat_dim]``; train: ``(logits or None, feature)`` (see the head)."""
        return self.forward_head(self.forward_features(images, cam_label, view_label))

    @torch.jit.ignore
    def get_classifier(self) -> Optional[nn.Module]:
        """The head's identity classifier(s), ``None`` without."""
        return self.head.get_classifier()

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for ``num_classes`` identities (0: none), e.g. to fine-tune on another data set."""
        self.head.reset_classifier(num_classes)

    set_grad_checkpointing = _backbone_switch("set_grad_checkpointing", "The backbone's "
                                              "``set_grad_checkpointing(enable)``: recompute block activations "
                                              "in the backward pass to save memory.")
    set_fused_inference = _backbone_switch("set_fused_inference", "The backbone's ``set_fused_inference(enable)``: "
                                           "CPU fp32 inference through packed-weight kernels (same outputs).")

    @torch.jit.ignore
    def parts(self) -> dict[str, Optional[nn.Module]]:
        """The parts whose parameters make up the model's, by name (``None`` for a part it lacks)."""
        return {"backbone": self.backbone, "adapter": self.adapter, "neck": self.neck, "head": self.head}

    @torch.jit.ignore
    def input_names(self) -> list[str]:
        """Names of a call's inputs: :attr:`image_names`, then the labels the backbone's tables need."""
        return [*self.image_names, *label_counts(self.backbone)]

    @torch.jit.ignore
    def example_inputs(self, batch: int = 2, generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Random inputs by :meth:`input_names` (labels in range), on the model's device."""
        return random_inputs(self.backbone, self.image_names, batch, generator, next(self.parameters()).device)

    @torch.jit.ignore
    def call_args(self, inputs: dict[str, torch.Tensor]) -> tuple[tuple[Any], dict[str, Any]]:
        """Inputs by name -> ``(args, kwargs)`` of the call: ``model(images, cam_label=...)``, or with one image
        batch per modality ``model({"rgb": ..., "nir": ..., "tir": ...}, cam_label=...)``."""
        return pack_call(self.image_names, inputs)


class ReIDModel(BuiltModel):
    """Backbone, optional width adapter, optional neck and a BNNeck head, called like the backbone.

    The backbone returns every token ``[B, 1 + H*W, out_dim]``; the adapter (if any) projects them to the
    neck's width; the neck (if any) adds its multi-scale context to the CLS (:meth:`forward_features`
    returns these tokens); the CLS goes through the head. Eval mode returns the embedding ``[B, feat_dim]``;
    train mode ``(logits [B, num_classes] or None, feature [B, feat_dim])`` (see :class:`~reid_ms.BNNeckHead`).

    Args:
        backbone: any module with ``forward(images, cam_label, view_label) -> [B, 1 + H*W, out_dim]``
            and the attributes ``grid_size`` ``(H, W)`` and ``out_dim``.
        neck: a :class:`~reid_ms.MultiScaleSlidingWindow` of width ``feat_dim``, or ``None``.
        head: a :class:`~reid_ms.BNNeckHead` of width ``feat_dim``; ``None`` builds one without classifier.
        adapter: a :class:`~reid_ms.DimAdapter` from ``backbone.out_dim`` to the neck's width, or ``None``.
    """

    def __init__(self, backbone: nn.Module, neck: Optional[MultiScaleSlidingWindow] = None, *,
                 head: Optional[BNNeckHead] = None, adapter: Optional[DimAdapter] = None) -> None:
        super().__init__(backbone, neck, adapter=adapter)
        head = BNNeckHead(self.token_dim) if head is None else head
        if head.feat_dim != self.token_dim:
            raise ConfigError(f"the head is {head.feat_dim} wide but the features reaching it are {self.token_dim} "
                              f"wide; build BNNeckHead(feat_dim={self.token_dim}, ...)")
        self.head = head
