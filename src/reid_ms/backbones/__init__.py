"""Backbones: every one takes ``(images, cam_label=None, view_label=None)`` and returns all tokens."""

from reid_ms.backbones.vit import VitTrans
from reid_ms.backbones.clip import ClipVisual

__all__ = ["VitTrans", "ClipVisual"]
