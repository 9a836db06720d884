"""TransReID's JPM model: ViT up to its last block -> Jigsaw Patch Module -> five BNNecks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from reid_ms.backbones._common import Label
from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import ConfigError
from reid_ms.heads.multibranch import MultiBranchBNNeckHead
from reid_ms.models.base import BuiltModel
from reid_ms.necks.jpm import JigsawPatchNeck
from reid_ms.necks.multiscale import MultiScaleSlidingWindow


class JPMReIDModel(BuiltModel):
    """TransReID with its Jigsaw Patch Module, called like :class:`~reid_ms.ReIDModel`.

    TransReID's layout: the backbone stays whole but runs only up to its last block
    (``forward_blocks(..., end=-1)``, no final norm); the JPM (``self.jpm``) holds two copies of that block
    and the final norm (``b1``, ``b2``). The backbone's own last block and final norm are unused, as in
    TransReID (whose checkpoints hold them under ``base.``, so the keys match); they are frozen
    (``requires_grad=False``) so that training leaves them out and DDP needs no ``find_unused_parameters``.
    Keep them frozen when unfreezing the rest of the model.

    ``forward_features``: the global feature (``b1``'s CLS), then the ``divide_length`` local CLS features
    of ``b2`` (see :class:`~reid_ms.JigsawPatchNeck`), as tokens ``[B, 1 + divide_length, D]``;
    ``forward_head`` puts them side by side, ``[B, (1 + divide_length) * D]``, for the head
    (:class:`~reid_ms.MultiBranchBNNeckHead`, one BNNeck per branch); eval returns
    ``cat(global, local_1 / divide_length, ...)`` before or after them: 3840 wide at ViT-B.

    With a multi-scale neck (``vit_b16_ms_jpm``) the neck reads ``b1``'s output tokens: those are the
    global branch's final tokens (last block + norm over the whole sequence), what the neck reads in
    ``vit_b16_ms``; its context is added to the global feature only. The local features come from
    patch subsets of another sequence and are left as TransReID computes them. A fresh (zero) neck gives
    the plain JPM model.

    Args:
        backbone: a :class:`~reid_ms.VitTrans`; its last block and final norm are frozen in place (see above).
        neck: a :class:`~reid_ms.MultiScaleSlidingWindow` as wide as the backbone, or ``None``.
        num_classes, neck_feat: of the head (see :class:`~reid_ms.BNNeckHead`).
        shift_num, shuffle_groups, divide_length, rearrange: of the JPM (TransReID's defaults 5, 2, 4, True).

    Attributes:
        feat_dim: ``(1 + divide_length) * D``.
        model_name, load_report: set by :func:`~reid_ms.build`.
    """

    head: MultiBranchBNNeckHead

    def __init__(self, backbone: VitTrans, neck: Optional[MultiScaleSlidingWindow] = None, *, num_classes: int = 0,
                 neck_feat: str = "before", shift_num: int = 5, shuffle_groups: int = 2, divide_length: int = 4,
                 rearrange: bool = True) -> None:
        if not isinstance(backbone, VitTrans):
            raise ConfigError(f"JPMReIDModel needs a reid_ms.VitTrans backbone (its last block makes the branches), "
                              f"got {type(backbone).__name__}")
        super().__init__(backbone, neck)
        self.jpm = JigsawPatchNeck(backbone.blocks[-1], backbone.norm, shift_num=shift_num,
                                   shuffle_groups=shuffle_groups, divide_length=divide_length, rearrange=rearrange)
        problem = self.jpm.patch_count_problem(backbone.num_patches)
        if problem is not None:
            h, w = backbone.grid_size
            raise ConfigError(f"JPMReIDModel: the backbone's {h}x{w} grid: {problem}")
        backbone.blocks[-1].requires_grad_(False)
        backbone.norm.requires_grad_(False)
        self.head = MultiBranchBNNeckHead(self.token_dim, 1 + divide_length, num_classes=num_classes,
                                          neck_feat=neck_feat, local_scale=1.0 / divide_length)

    def forward_features(self, images: torch.Tensor, cam_label: Label = None,
                         view_label: Label = None) -> torch.Tensor:
        """Images ``[B, C, img_h, img_w]`` -> ``[B, 1 + divide_length, D]``: the global, then the local features.

        The local features are not yet divided by ``divide_length``; the head does that for the embedding.
        """
        tokens = self.backbone.forward_blocks(self.backbone.embed(images, cam_label, view_label), end=-1)
        global_cls = self.with_neck(self.jpm.global_branch(tokens))[:, :1]
        return torch.cat([global_cls, self.jpm.local_branch(tokens)], dim=1)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + divide_length, D]`` -> the branches side by side ``[B, (1 + divide_length) * D]``."""
        return tokens.flatten(1)

    @torch.jit.ignore
    def parts(self) -> dict[str, Optional[nn.Module]]:
        parts = super().parts()
        return {"backbone": parts.pop("backbone"), "adapter": parts.pop("adapter"), "jpm branches": self.jpm,
                **parts}
