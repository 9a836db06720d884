"""Necks: modules between a backbone's tokens and the head (multi-scale CLS context, width adapters)."""

from reid_ms.necks.adapter import DimAdapter
from reid_ms.necks.multiscale import MultiScaleSlidingWindow

__all__ = ["DimAdapter", "MultiScaleSlidingWindow"]
