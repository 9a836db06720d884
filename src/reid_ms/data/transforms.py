"""TransReID's training augmentation (CLIP-ReID and MambaPro use the same pipeline)."""

from __future__ import annotations

from collections.abc import Sequence

from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from reid_ms.data.folder import REID_MEAN, REID_STD
from reid_ms.errors import ConfigError

__all__ = ["train_transform"]


def train_transform(img_size: tuple[int, int] = (256, 128), flip_prob: float = 0.5, padding: int = 10,
                    erase_prob: float = 0.5, mean: Sequence[float] = REID_MEAN,
                    std: Sequence[float] = REID_STD) -> T.Compose:
    """PIL image -> augmented, normalised ``[3, H, W]`` float tensor, TransReID's training pipeline.

    In order: resize to ``img_size`` (bicubic, aspect ratio ignored), horizontal flip with
    ``flip_prob``, zero-pad ``padding`` pixels on every side, random crop back to ``img_size``, scale to
    [0, 1] and normalise with ``mean`` / ``std``, then with ``erase_prob`` erase one rectangle (2-33 % of
    the area, aspect ratio 0.3-3.3) with per-pixel standard-normal noise (timm's ``RandomErasing``,
    ``mode="pixel"``, on the normalised tensor).
    """
    if len(img_size) != 2 or min(img_size) < 1:
        raise ConfigError(f"img_size must be (height, width) with positive sides, got {img_size!r}")
    if not (0.0 <= flip_prob <= 1.0 and 0.0 <= erase_prob <= 1.0) or padding < 0:
        raise ConfigError(f"flip_prob and erase_prob must lie in [0, 1] and padding be >= 0, got "
                          f"{flip_prob}, {erase_prob}, {padding}")
    size = (int(img_size[0]), int(img_size[1]))
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=flip_prob),
        T.Pad(padding),
        T.RandomCrop(size),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
        RandomErasing(probability=erase_prob, mode="pixel", max_count=1, device="cpu"),
    ])
