"""Image folders in Market-1501 naming, and the evaluation transform re-ID models expect.

Market-1501 (and DukeMTMC-reID, which shares the scheme) names every crop ``PPPP_cC...``: the person
id, then ``_c`` and the 1-based camera number, e.g. ``0001_c1s1_000151_01.jpg`` is person 1 seen by
camera 1. Person ``-1`` marks junk crops (TransReID's and CLIP-ReID's loaders drop them), person ``0``
distractors (kept; they can never be a correct match). Cameras are returned 0-based, as those loaders
and the camera embedding (SIE) use them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from reid_ms.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS", "REID_MEAN", "REID_STD", "JUNK_PID", "parse_market_name", "list_images",
    "read_image", "eval_transform", "ReidImageFolder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# TransReID's and CLIP-ReID's published configs (PIXEL_MEAN / PIXEL_STD) both normalise with 0.5/0.5,
# i.e. map [0, 1] to [-1, 1], for ImageNet ViT and CLIP backbones alike. Checkpoints trained with them
# expect exactly this; CLIP's own pretraining statistics are not what CLIP-ReID feeds its encoder.
REID_MEAN = (0.5, 0.5, 0.5)
REID_STD = (0.5, 0.5, 0.5)

JUNK_PID = -1

_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")


def parse_market_name(path: str | Path) -> tuple[int, int]:
    """``(person id, 0-based camera)`` from a Market-1501 file name; ``0001_c1s1_000151_01.jpg -> (1, 0)``.

    Raises:
        InputError: the name does not start with ``<pid>_c<camera>`` or the camera number is 0.
    """
    name = Path(path).name
    found = _MARKET_NAME.match(name)
    if found is None:
        raise InputError(f"cannot read person and camera ids from file name {name!r} ({path}); expected "
                         f"Market-1501 naming '<pid>_c<camera>...', e.g. '0001_c1s1_000151_01.jpg'")
    pid, cam = int(found.group(1)), int(found.group(2))
    if cam < 1:
        raise InputError(f"camera numbers in Market-1501 names start at 1, got c{cam} in {name!r} ({path})")
    return pid, cam - 1


def list_images(root: str | Path) -> list[Path]:
    """Image files directly inside ``root`` (sorted by name; ``IMAGE_EXTENSIONS``, any case)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"image folder {str(root)!r} does not exist or is not a directory")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as an RGB PIL image; an unreadable, damaged or decompression-bomb file raises
    :class:`InputError` naming it."""
    try:
        with warnings.catch_warnings():
            # PIL only warns up to twice its pixel limit; a re-ID crop that large is a damaged or hostile file
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"refusing image {str(path)!r}: {exc} (raise PIL.Image.MAX_IMAGE_PIXELS if the "
                         f"image is genuine)") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}") from exc


def eval_transform(
    img_size: tuple[int, int], mean: Sequence[float] = REID_MEAN, std: Sequence[float] = REID_STD,
) -> T.Compose:
    """PIL image -> normalised ``[3, H, W]`` float tensor, as TransReID's and CLIP-ReID's test loaders do.

    The crop is resized to ``img_size`` ignoring its aspect ratio, with PIL's bilinear filter (torchvision's
    ``Resize`` default, which both code bases use at test time), then scaled to [0, 1] and normalised.
    """
    return T.Compose([
        T.Resize(tuple(img_size), interpolation=T.InterpolationMode.BILINEAR),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


class ReidImageFolder(Dataset):
    """A flat folder of Market-1501-named crops; item ``i`` is ``(image [3, H, W], i)``.

    ``paths``, ``pids`` and ``camids`` hold every file's path and parsed ids in the (sorted) item order.
    With ``ids=False`` the names may be anything and ``pids`` / ``camids`` are ``None``.
    Unreadable images raise :class:`InputError` naming the file.
    """

    def __init__(self, root: str | Path, transform: T.Compose, files: Sequence[Path] | None = None,
                 ids: bool = True) -> None:
        self.root = Path(root)
        self.paths = list(files) if files is not None else list_images(self.root)
        parsed = [parse_market_name(p) for p in self.paths] if ids else None
        self.pids = None if parsed is None else [pid for pid, _ in parsed]
        self.camids = None if parsed is None else [cam for _, cam in parsed]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.paths[index])), index
