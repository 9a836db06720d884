"""A built model's input configuration: the size, normalisation and resize filter its images need.

:func:`~reid_ms.build` stores it on the model as ``model.pretrained_cfg`` in timm's format, so
``timm.data.resolve_data_config(model=model)`` returns it (instead of ImageNet's defaults), and
:class:`~reid_ms.FeatureExtractor` and ``reid-ms extract`` read it from there rather than assuming
values. A model assembled by hand gets the same dict from :func:`input_config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision import transforms as T

from reid_ms.data import REID_MEAN, REID_STD
from reid_ms.errors import ConfigError

__all__ = ["input_config", "model_input_config", "image_transform", "resize_tensor"]

# TransReID's and CLIP-ReID's test loaders resize with torchvision's default filter
INTERPOLATION = "bilinear"


def input_config(model: nn.Module, mean: Sequence[float] = REID_MEAN, std: Sequence[float] = REID_STD,
                 interpolation: str = INTERPOLATION) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` of a reid_ms model (or backbone), from its backbone's ``img_size``.

    Returns:
        ``{"input_size": (C, H, W), "mean", "std", "interpolation", "crop_pct": 1.0, "crop_mode":
        "squash"}``: the crop is resized to ``(H, W)`` ignoring its aspect ratio (timm's ``squash``
        with nothing cropped), as re-ID test loaders do.
    """
    backbone = getattr(model, "backbone", model)
    in_chans, img_size = getattr(backbone, "in_chans", None), getattr(backbone, "img_size", None)
    if in_chans is None or img_size is None:
        raise ConfigError(f"{type(model).__name__} has no backbone with img_size and in_chans; expected a model "
                          f"from reid_ms.build or a reid_ms backbone")
    return {
        "input_size": (int(in_chans), *map(int, img_size)),
        "mean": tuple(float(m) for m in mean),
        "std": tuple(float(s) for s in std),
        "interpolation": interpolation,
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }


def model_input_config(model: nn.Module) -> dict[str, Any]:
    """``model.pretrained_cfg`` when it has one (any model from :func:`~reid_ms.build`), else :func:`input_config`."""
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg is None:
        return input_config(model)
    missing = [k for k in ("input_size", "mean", "std", "interpolation") if k not in cfg]
    if missing:
        raise ConfigError(f"model.pretrained_cfg lacks {missing}; set it with reid_ms.preprocess.input_config(model)")
    return dict(cfg)


def _interpolation(cfg: Mapping[str, Any]) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(cfg["interpolation"])
    except ValueError as exc:
        raise ConfigError(f"unknown interpolation {cfg['interpolation']!r} in the model's input config; use one "
                          f"of {[m.value for m in T.InterpolationMode]}") from exc


def image_transform(cfg: Mapping[str, Any]) -> T.Compose:
    """PIL image -> normalised ``[C, H, W]`` float tensor for the input config ``cfg``."""
    return T.Compose([
        T.Resize(tuple(cfg["input_size"][1:]), interpolation=_interpolation(cfg)),
        T.ToTensor(),
        T.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
    ])


def resize_tensor(images: torch.Tensor, cfg: Mapping[str, Any]) -> torch.Tensor:
    """Float images ``[C, h, w]`` in ``[0, 1]`` -> normalised ``[C, H, W]`` (antialiased resize, like PIL's)."""
    out = T.functional.resize(images, list(cfg["input_size"][1:]), interpolation=_interpolation(cfg),
                              antialias=True)
    return T.functional.normalize(out, list(cfg["mean"]), list(cfg["std"]))
