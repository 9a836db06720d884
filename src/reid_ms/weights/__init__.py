"""Checkpoint loaders: one module per checkpoint family, each a pure filter plus one all-or-nothing load."""

from reid_ms.weights._io import read_checkpoint
from reid_ms.weights.vit import load_vit_weights, vit_checkpoint_filter
from reid_ms.weights.clip import clip_checkpoint_filter, load_clip_weights

__all__ = ["load_vit_weights", "vit_checkpoint_filter", "load_clip_weights", "clip_checkpoint_filter",
           "read_checkpoint"]
