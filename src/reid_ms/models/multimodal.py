"""Multi-modal re-ID (RGBNT201, RGBNT100, MSVR310): one shared backbone over RGB, NIR and TIR images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import nn

from reid_ms.backbones._common import Label
from reid_ms.errors import ConfigError, InputError
from reid_ms.heads import BNNeckHead
from reid_ms.models.base import BuiltModel
from reid_ms.necks.multiscale import MultiScaleSlidingWindow

MODALITIES = ("rgb", "nir", "tir")
MISSING = ("error", "zeros")


def _repeat_label(label: Label, batch: int, times: int, name: str) -> Label:
    """Per-image labels for the ``times`` modality batches stacked into one backbone call."""
    if (isinstance(label, torch.Tensor) and label.dim() == 1
            or isinstance(label, Sequence) and not isinstance(label, str)):
        # shape[0], not len(): len() would fix the batch size of a torch.export graph
        count = label.shape[0] if isinstance(label, torch.Tensor) else len(label)
        if count != batch:
            raise InputError(f"{name} must hold one label per image ({batch}), got {count}")
        return label.repeat(times) if isinstance(label, torch.Tensor) else list(label) * times
    return label  # None, an int or a 0-d tensor: the same for every image; the backbone checks the rest


class MultiModalReIDModel(BuiltModel):
    """One backbone shared by the modalities, the neck per modality, concatenation fusion, one BNNeck.

    ``forward({"rgb": x, "nir": y, "tir": z}, cam_label=None, view_label=None)``: each modality's images
    ``[B, C, img_h, img_w]`` go through the same backbone (one call over the modalities stacked along the
    batch: every operation is per image, so this is the per-modality run in fewer, larger products),
    with the same camera/view labels; each modality's CLS gets the neck's context from its own patch
    grid; the per-modality embeddings are concatenated in ``modalities`` order, ``[B, M * D]``, and go
    through a BNNeck of that width. Eval returns ``[B, feat_dim]``, train ``(logits or None, feature)``
    like :class:`~reid_ms.ReIDModel`.

    The neck is one module shared by the modalities, as the backbone is: it learns where multi-scale
    context sits in a person's token grid, which does not depend on the sensor, and a dense neck per
    modality would triple its 198 M parameters at ViT-B.

    Args:
        backbone: a :class:`~reid_ms.VitTrans` or :class:`~reid_ms.ClipVisual` (any module with
            ``forward(images, cam_label, view_label) -> [B, 1 + H*W, out_dim]``, ``grid_size``, ``out_dim``).
        neck: a :class:`~reid_ms.MultiScaleSlidingWindow` as wide as the backbone's tokens, or ``None``.
        num_classes, neck_feat: of the head (see :class:`~reid_ms.BNNeckHead`).
        modalities: input names, in fusion order; default ``("rgb", "nir", "tir")``.
        missing: a modality absent from the input: ``"error"`` (default) raises :class:`~reid_ms.InputError`;
            ``"zeros"`` puts a zero embedding in its place (in train and eval mode alike), so a model trained
            on all modalities can be evaluated on fewer with the same embedding width.
    """

    image_names: tuple[str, ...] = MODALITIES

    def __init__(self, backbone: nn.Module, neck: Optional[MultiScaleSlidingWindow] = None, *, num_classes: int = 0,
                 neck_feat: str = "before", modalities: Sequence[str] = MODALITIES, missing: str = "error") -> None:
        if (isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities
                or not all(isinstance(m, str) and m for m in modalities) or len(set(modalities)) != len(modalities)):
            raise ConfigError(f"modalities must be distinct non-empty names, e.g. {MODALITIES}, got {modalities!r}")
        if missing not in MISSING:
            raise ConfigError(f"missing must be one of {MISSING}, got {missing!r}")
        super().__init__(backbone, neck)
        self.modalities = self.image_names = tuple(modalities)
        self.missing = missing
        self.head = BNNeckHead(len(self.modalities) * self.token_dim, num_classes=num_classes, neck_feat=neck_feat)

    @property
    def modality_dim(self) -> int:
        """Width of one modality's feature (the backbone's or adapter's token width)."""
        return self.token_dim

    def _present(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[str], int]:
        if not isinstance(inputs, Mapping):
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise InputError(f"MultiModalReIDModel takes a dict of image batches, one per modality, "
                             f"{{{', '.join(repr(m) + ': images' for m in self.modalities)}}}; got {shape}")
        unknown = [k for k in inputs if k not in self.modalities]
        if unknown:
            raise InputError(f"MultiModalReIDModel got inputs {unknown} it was not built for; its modalities are "
                             f"{list(self.modalities)}")
        present = [m for m in self.modalities if m in inputs]
        absent = [m for m in self.modalities if m not in inputs]
        if not present:
            raise InputError(f"MultiModalReIDModel got no images; pass {list(self.modalities)}")
        if absent and self.missing == "error":
            raise InputError(f"MultiModalReIDModel needs every modality {list(self.modalities)}, got "
                             f"{present} ({absent} missing); build it with missing='zeros' to zero-fill the "
                             f"embedding of a missing modality")
        for m in present:
            if not isinstance(inputs[m], torch.Tensor) or inputs[m].dim() != 4:
                shape = tuple(inputs[m].shape) if isinstance(inputs[m], torch.Tensor) else type(inputs[m]).__name__
                raise InputError(f"MultiModalReIDModel: inputs[{m!r}] must be images [B, C, H, W], got {shape}")
        batch = inputs[present[0]].shape[0]
        if any(inputs[m].shape[0] != batch for m in present[1:]):
            sizes = {m: inputs[m].shape[0] for m in present}
            raise InputError(f"MultiModalReIDModel: every modality needs the same batch size, got {sizes}")
        return present, batch

    def forward_features(self, inputs: Mapping[str, torch.Tensor], cam_label: Label = None,
                         view_label: Label = None) -> dict[str, torch.Tensor]:
        """Each modality present in ``inputs`` -> its tokens after the neck ``[B, 1 + H*W, D]``, by name."""
        present, batch = self._present(inputs)
        times = len(present)
        images = torch.cat([inputs[m] for m in present]) if times > 1 else inputs[present[0]]
        tokens = self.tokens(images, _repeat_label(cam_label, batch, times, "cam_label"),
                             _repeat_label(view_label, batch, times, "view_label"))
        # unflatten, not split(batch): split would fix an export's batch
        return dict(zip(present, self.with_neck(tokens).unflatten(0, (times, -1)).unbind(0)))

    def pool(self, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tokens by modality -> the CLS features side by side ``[B, M * D]`` in ``modalities`` order; a
        missing modality's are zero (``missing="zeros"``)."""
        some = next(iter(tokens.values()))[:, 0]
        return torch.cat([tokens[m][:, 0] if m in tokens else torch.zeros_like(some) for m in self.modalities],
                         dim=1)

    def forward(self, inputs: Mapping[str, torch.Tensor], cam_label: Label = None,
                view_label: Label = None) -> torch.Tensor | tuple[Optional[torch.Tensor], torch.Tensor]:
        """Eval: the embedding ``[B, feat_dim]``; train: ``(logits or None, feature [B, feat_dim])``."""
        # the argument's name is the exported graph's: inputs_rgb, inputs_nir, ... (torch.export)
        return super().forward(inputs, cam_label, view_label)

    def forward_modalities(self, inputs: Mapping[str, torch.Tensor], cam_label: Label = None,
                           view_label: Label = None) -> dict[str, torch.Tensor]:
        """The embedding ``[B, D]`` of each modality present in ``inputs`` (the neck-enhanced CLS)."""
        return {m: t[:, 0] for m, t in self.forward_features(inputs, cam_label, view_label).items()}

