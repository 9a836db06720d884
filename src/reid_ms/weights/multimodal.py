"""Loading into :class:`reid_ms.MultiModalReIDModel`: its one shared backbone, or a saved model whole."""

from __future__ import annotations

import os

from torch import nn

from reid_ms.weights._common import LoadReport, load_file
from reid_ms.weights.built import backbone_filter, built_model_filter


def load_multimodal_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a checkpoint into a :class:`~reid_ms.MultiModalReIDModel`, all of it or nothing.

    A backbone checkpoint (anything :func:`~reid_ms.load_vit_weights` or :func:`~reid_ms.load_clip_weights`
    reads, chosen by the backbone's type) fills the shared backbone; the neck and the head keep their
    initialisation. A multi-modal model saved with ``torch.save(model.state_dict(), path)`` loads whole.

    Returns:
        A :class:`~reid_ms.LoadReport` with the model's keys (``backbone.*``, ``neck.*``, ``head.*``).
    """
    backbone_filter(getattr(model, "backbone", None))  # a ConfigError names a model it cannot load
    return load_file(model, path, lambda obj, file, fmt: built_model_filter(obj, model, file, fmt))
