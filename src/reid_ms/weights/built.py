"""Loading into built models (backbone, adapter, neck, head): saved reid_ms models and backbone checkpoints.

A model saved with ``torch.save(model.state_dict(), path)`` (or under ``{"model": ...}``, as ``reid-ms
train`` writes ``last.pt``) has the built model's own keys (``backbone.*``, ``neck.*``, ``head.*``) and
loads exactly, every key and shape as built. Any other checkpoint goes through the filter of the
backbone's family; what it does not fill keeps its initialisation and is listed in the report. The
model is only read here for its keys and shapes: this module knows models by their attributes, not
their classes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import ConfigError
from reid_ms.weights._common import LoadReport
from reid_ms.weights._io import flatten_state_dict, strip_prefix
from reid_ms.weights.clip import clip_checkpoint_filter
from reid_ms.weights.vit import vit_checkpoint_filter

KIND_SAVED = "reid_ms"

# (file tensors of a re-ID head, report) -> the model's head keys filled from them
HeadFill = Callable[[dict[str, torch.Tensor], LoadReport], dict[str, torch.Tensor]]


def backbone_filter(backbone: object) -> Callable[..., tuple[dict[str, torch.Tensor], LoadReport,
                                                              dict[str, torch.Tensor]]]:
    """The checkpoint filter of ``backbone``'s family: :func:`vit_checkpoint_filter` or :func:`clip_checkpoint_filter`;
    anything else is a :class:`ConfigError`."""
    if isinstance(backbone, VitTrans):
        return vit_checkpoint_filter
    if isinstance(backbone, ClipVisual):
        return clip_checkpoint_filter
    raise ConfigError(f"reid_ms loads checkpoints into a VitTrans or ClipVisual backbone, got "
                      f"{type(backbone).__name__}; load your own backbone's weights with its own loader")


def saved_model(tensors: dict[str, torch.Tensor], ignored: dict[str, str], model: nn.Module, path: str,
                fmt: str) -> Optional[tuple[dict[str, torch.Tensor], LoadReport]]:
    """``(tensors, report)`` when ``tensors`` (flattened, unprefixed) has a built model's keys, else ``None``.

    The tensors are taken as they are: the load checks every key and shape against ``model`` before it
    computes with any of them, so nothing larger than the model is materialised.
    """
    if not any(k.startswith("backbone.") for k in tensors) or not hasattr(model, "backbone"):
        return None
    return tensors, LoadReport(path=path, format=fmt, kind=KIND_SAVED, ignored=ignored)


def built_model_filter(checkpoint: Mapping[str, Any], model: nn.Module, path: str = "<state dict>",
                       fmt: str = "state dict", fill_head: Optional[HeadFill] = None,
                       ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a checkpoint to every key of a built ``model`` (``backbone``, optional ``adapter``, ``neck``, ``head``).

    A saved reid_ms model of the same build is taken as it is (``report.kind == "reid_ms"``); the load
    then checks every key and shape. Any other checkpoint is mapped by the backbone's filter; a re-ID
    head it carries goes to ``fill_head`` (which may take some of it), and every model key still
    unfilled keeps its initialisation, listed in ``report.kept_init``.

    Returns:
        ``(state, report)`` with the model's keys, ready for :func:`~reid_ms.weights._common.load_all_or_nothing`.
    """
    tensors, ignored = flatten_state_dict(checkpoint, path)
    saved = saved_model(strip_prefix(tensors)[0], ignored, model, path, fmt)
    if saved is not None:
        return saved
    backbone, report, heads = backbone_filter(model.backbone)(checkpoint, model.backbone, path, fmt)
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    report.kept_init = [f"backbone.{k}" for k in report.kept_init]
    if fill_head is not None and heads:
        state.update(fill_head(heads, report))
    for k, v in model.state_dict().items():
        if k not in state:
            state[k] = v
            report.kept_init.append(k)
    return state, report
