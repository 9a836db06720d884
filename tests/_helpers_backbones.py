"""Tiny backbones with camera/view tables and their labels, for the speed-path tests."""

from __future__ import annotations

import torch

from reid_ms import ClipVisual, VitTrans

TINY_VIT = dict(img_size=(64, 32), embed_dim=64, depth=2, num_heads=4, camera_num=3, view_num=2)
TINY_CLIP = dict(img_size=(64, 32), width=64, layers=2, heads=4, output_dim=32, camera_num=3, view_num=2)


def tiny_backbone(kind: str, vector_noise: float, **overrides) -> torch.nn.Module:
    """A seeded tiny ``VitTrans`` (``kind="vit"``) or ``ClipVisual`` in eval mode, ``vector_noise`` times
    Gaussian noise added to every 1-D parameter (norms and biases), so that a misplaced scale or bias, or
    a sample mixed into another's chunk, changes the output."""
    torch.manual_seed(0)
    cfg = (TINY_VIT if kind == "vit" else TINY_CLIP) | overrides
    model = VitTrans(**cfg) if kind == "vit" else ClipVisual(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * vector_noise)
    return model.eval()


def tiny_labels(batch: int) -> dict[str, torch.Tensor]:
    """Seeded camera and view labels for the tiny backbones' tables."""
    gen = torch.Generator().manual_seed(1)
    return dict(cam_label=torch.randint(0, 3, (batch,), generator=gen),
                view_label=torch.randint(0, 2, (batch,), generator=gen))
