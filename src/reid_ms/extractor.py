"""From images, crops and a tracker's boxes to embeddings: :class:`FeatureExtractor` and a BoxMOT adapter.

    fx = reid_ms.FeatureExtractor("vit_b16_ms", weights="model.pth", camera_num=6)
    emb = fx(["a.jpg", pil_image, rgb_array, "crops/"], cam_label="mean")    # [N, D]
    emb = fx(bgr_crops, bgr=True, cam_label="none")                          # OpenCV crops
    emb = fx.from_boxes(frame_bgr, boxes_xyxy, bgr=True, cam_label=0)       # [N, D], L2-normalised

Preprocessing is the model's own (``model.pretrained_cfg``, see :mod:`reid_ms.preprocess`): PIL images,
files and arrays go through the same PIL resize as ``reid-ms extract``, so their embeddings are the
same; tensors are resized by torchvision's antialiased tensor resize (close to PIL's, not bit-equal).

Cameras. A model built with a camera/view table needs to be told what to do: real labels (an int for
all images, or one per image), ``"mean"`` (the table's mean row on every image: the camera is unknown,
the average camera stands in) or ``"none"`` (no camera/view vector at all, as if the model had no table).
There is no default: calling such a model without ``cam_label`` is an error naming these choices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reid_ms.data import list_images
from reid_ms.errors import ConfigError, InputError
from reid_ms.models import BuiltModel, MultiModalReIDModel
from reid_ms.preprocess import image_transform, model_input_config, resize_tensor

__all__ = ["FeatureExtractor", "BoxMOTAdapter", "CAMERA_POLICIES"]

logger = logging.getLogger("reid_ms.extractor")

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
CamLabel = Union[int, Sequence[int], torch.Tensor, str, None]

# What to do for crops whose camera is unknown, on a model with a camera/view table
CAMERA_POLICIES = ("mean", "none")

def _side_info_table(backbone: nn.Module) -> Optional[str]:
    """Attribute name of the backbone's camera/view table (VitTrans: ``sie_embed``; ClipVisual: ``cv_embed``)."""
    for name in ("sie_embed", "cv_embed"):
        if getattr(backbone, name, None) is not None:
            return name
    return None


@contextmanager
def _table_policy(backbone: nn.Module, name: str, policy: str) -> Iterator[None]:
    """While active, every row of the camera/view table is its mean (``"mean"``) or zero (``"none"``).

    The table is swapped for the duration of the call only and restored afterwards, so the model and
    its parameters are untouched; with every row equal, any label selects that row.
    """
    original: nn.Parameter = getattr(backbone, name)
    data = original.detach()
    if policy == "mean":
        replaced = data.mean(dim=0, keepdim=True).expand_as(data).clone()
    else:
        replaced = torch.zeros_like(data)
    backbone._parameters[name] = nn.Parameter(replaced, requires_grad=False)
    try:
        yield
    finally:
        backbone._parameters[name] = original


class FeatureExtractor:
    """Embeddings of images, crops or a tracker's boxes with a reid_ms model and its own preprocessing.

    Args:
        model: a registered name (see :func:`~reid_ms.list_models`) or a model from :func:`~reid_ms.build`.
        weights: a checkpoint for a named model (``build(model, pretrained=weights)``); ``None`` leaves it
            randomly initialised (a warning says so). A built model is used as it is.
        device: torch device; ``None``: the built model's device, or ``"cuda"`` when available for a name.
        batch_size: images per forward pass.
        flip: average each image's embedding with its horizontal mirror's.
        **build_overrides: :func:`~reid_ms.build` keywords for a named model (``camera_num``, ``img_size``,
            ``stride_size``, ...).

    Attributes:
        model: the model, in eval mode. cfg: its input config (``input_size``, ``mean``, ``std``,
        ``interpolation``). feat_dim: embedding width ``D``. camera_table: whether the model has a
        camera/view table (then ``cam_label`` is required).
    """

    def __init__(self, model: str | nn.Module, weights: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, batch_size: int = 64, flip: bool = False,
                 **build_overrides: Any) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(model, str):
            from reid_ms.registry import build   # the registry imports the models; keep this module light

            if weights is None:
                logger.warning("no weights given: %s is randomly initialised; its features are only good for "
                               "trying the pipeline", model)
            elif not Path(weights).is_file():
                raise ConfigError(f"weights {str(weights)!r} does not exist or is not a file")
            model = build(model, pretrained=None if weights is None else str(weights), **build_overrides)
            device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        elif isinstance(model, BuiltModel):
            if weights is not None or build_overrides:
                raise ConfigError("weights and build arguments go with a model name; a built model is used as it "
                                  "is (load weights into it with reid_ms.build(name, pretrained=...))")
        else:
            raise ConfigError(f"model must be a registered name or a built reid_ms model (with a backbone and "
                              f"feat_dim; build one with reid_ms.build), got {type(model).__name__}")
        if isinstance(model, MultiModalReIDModel):
            raise ConfigError(f"{type(model).__name__} takes one image per modality ({', '.join(model.modalities)}); "
                              f"call it with a dict of batches instead of a FeatureExtractor")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.batch_size = batch_size
        self.flip = flip
        self.cfg = model_input_config(model)
        self.feat_dim = model.feat_dim
        backbone = model.backbone
        self.camera_num = int(getattr(backbone, "camera_num", 0))
        self.view_num = int(getattr(backbone, "view_num", 0))
        self._table = _side_info_table(backbone)
        self.camera_table = self._table is not None
        self._transform = image_transform(self.cfg)

    # -- inputs -----------------------------------------------------------------------------------

    def _expand(self, images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
        """One flat list of images; a folder stands for its image files (sorted by name)."""
        single = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            items: list[ImageLike] = list(images)                       # [N, H, W, 3] batch of crops
        elif isinstance(images, torch.Tensor) and images.dim() == 4:
            items = list(images)                                        # [N, 3, H, W]
        elif isinstance(images, single):
            items = [images]
        elif isinstance(images, Sequence):
            items = list(images)
        else:
            raise InputError(f"expected a path, PIL image, array, tensor or a list of them, got {type(images).__name__}")
        out: list[ImageLike] = []
        for item in items:
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                out.extend(list_images(Path(item)))
            else:
                out.append(item)
        return out

    def _prepare(self, item: ImageLike, bgr: bool, index: int) -> torch.Tensor:
        """One image -> normalised ``[C, H, W]``."""
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                raise InputError(f"image {index}: {str(path)!r} does not exist")
            try:
                with Image.open(path) as img:
                    return self._transform(img.convert("RGB"))
            except (OSError, ValueError) as exc:
                raise InputError(f"image {index}: cannot read {str(path)!r}: {exc}") from exc
        if isinstance(item, Image.Image):
            return self._transform(item.convert("RGB"))
        if isinstance(item, np.ndarray):
            if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
                raise InputError(f"image {index}: arrays must be H x W x 3 uint8 (RGB, or BGR with bgr=True), got "
                                 f"shape {item.shape} dtype {item.dtype}")
            if item.shape[0] == 0 or item.shape[1] == 0:
                raise InputError(f"image {index}: empty array of shape {item.shape}")
            rgb = item[:, :, ::-1] if bgr else item
            return self._transform(Image.fromarray(np.ascontiguousarray(rgb)))
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3 or item.shape[1] == 0 or item.shape[2] == 0:
                raise InputError(f"image {index}: tensors must be 3 x H x W, got shape {tuple(item.shape)}")
            if item.dtype == torch.uint8:
                item = item.float() / 255.0
            elif not item.is_floating_point():
                raise InputError(f"image {index}: tensors must be uint8 (0-255) or float (0-1), got {item.dtype}")
            elif float(item.min()) < 0.0 or float(item.max()) > 1.0:
                raise InputError(f"image {index}: float tensors must hold values in [0, 1] (unnormalised); got "
                                 f"[{float(item.min()):.3g}, {float(item.max()):.3g}]")
            if bgr:
                item = item.flip(0)
            return resize_tensor(item.float().cpu(), self.cfg)
        raise InputError(f"image {index}: unsupported type {type(item).__name__} (path, PIL image, H x W x 3 uint8 "
                         f"array or 3 x H x W tensor)")

    # -- cameras ----------------------------------------------------------------------------------

    def _labels(self, cam_label: CamLabel, view_label: CamLabel, count: int) -> tuple[Any, Any, Optional[str]]:
        """``(cam_label, view_label, policy)`` to call the model with for ``count`` images."""
        if cam_label is None and self.camera_table and view_label is None:
            raise InputError(f"this model has a camera/view table (camera_num={self.camera_num}, "
                             f"view_num={self.view_num}); say which row to use: cam_label=<int or one per "
                             f"image> for known cameras, cam_label='mean' (the table's mean row) or "
                             f"cam_label='none' (no camera information) for crops of unknown cameras")
        if isinstance(cam_label, str):
            if cam_label not in CAMERA_POLICIES:
                raise InputError(f"cam_label={cam_label!r} is not a policy; use one of {CAMERA_POLICIES} or camera "
                                 f"integers")
            if not self.camera_table:
                if cam_label == "mean":
                    raise InputError("cam_label='mean' needs a model with a camera/view table; this one has none "
                                     "(call it without cam_label)")
                return None, None, None
            # every row of the table is the same during the call, so row 0 of each label stands for it
            cam = 0 if self.camera_num > 0 else None
            view = 0 if self.view_num > 0 else None
            return cam, view, cam_label
        labels = []
        for name, label in (("cam_label", cam_label), ("view_label", view_label)):
            if label is not None and not isinstance(label, int):
                label = torch.as_tensor(label)
                if label.dim() != 1 or label.shape[0] != count:
                    raise InputError(f"{name} must be an int or hold one label per image ({count}), got shape "
                                     f"{tuple(label.shape)}")
            labels.append(label)
        return labels[0], labels[1], None

    # -- embedding --------------------------------------------------------------------------------

    def embed(self, batch: torch.Tensor, cam_label: Any = None, view_label: Any = None) -> torch.Tensor:
        """Preprocessed images ``[B, C, H, W]`` -> embeddings ``[B, D]`` (with the mirror's when ``flip``)."""
        batch = batch.to(self.device)
        with torch.inference_mode():
            feats = self.model(batch, cam_label=cam_label, view_label=view_label).float()
            if self.flip:
                feats = (feats + self.model(batch.flip(-1), cam_label=cam_label, view_label=view_label).float()) / 2
        return feats.cpu()

    def _run(self, tensors: Sequence[torch.Tensor] | Iterator[torch.Tensor], count: int, cam_label: CamLabel,
             view_label: CamLabel) -> torch.Tensor:
        cam, view, policy = self._labels(cam_label, view_label, count)
        out = torch.empty(count, self.feat_dim)
        ctx = _table_policy(self.model.backbone, self._table, policy) if policy and self._table else nullcontext()
        pending: list[torch.Tensor] = []
        start = 0

        def flush() -> None:
            nonlocal start
            stop = start + len(pending)
            c = cam[start:stop].to(self.device) if isinstance(cam, torch.Tensor) else cam
            v = view[start:stop].to(self.device) if isinstance(view, torch.Tensor) else view
            out[start:stop] = self.embed(torch.stack(pending), c, v)
            start = stop
            pending.clear()

        with ctx:
            for t in tensors:
                pending.append(t)
                if len(pending) == self.batch_size:
                    flush()
            if pending:
                flush()
        return out

    def __call__(self, images: ImageLike | Sequence[ImageLike], cam_label: CamLabel = None,
                 view_label: CamLabel = None, bgr: bool = False) -> torch.Tensor:
        """Embeddings ``[N, D]`` float32 (CPU) of ``images``, in order (a folder: its files sorted by name).

        Args:
            images: a path (file or folder), PIL image, ``H x W x 3`` uint8 array, ``3 x H x W`` tensor
                (uint8, or float in ``[0, 1]``), a list of these, or a batch ``[N, H, W, 3]`` /
                ``[N, 3, H, W]``.
            cam_label: for a model with a camera/view table (required then): an int for every image, one
                label per image, ``"mean"`` or ``"none"`` (see the module docstring).
            view_label: view labels when the model has a view table and real labels are given.
            bgr: arrays and tensors are in BGR channel order (OpenCV's); files and PIL images are not affected.
        """
        items = self._expand(images)
        if not items:
            return torch.empty(0, self.feat_dim)
        return self._run((self._prepare(item, bgr, i) for i, item in enumerate(items)), len(items),
                         cam_label, view_label)

    def from_boxes(self, frame: np.ndarray, boxes_xyxy: np.ndarray | torch.Tensor | Sequence[Sequence[float]],
                   bgr: bool = True, cam_label: CamLabel = None, view_label: CamLabel = None) -> torch.Tensor:
        """L2-normalised embeddings ``[N, D]`` of ``N`` boxes in one video frame.

        Args:
            frame: ``H x W x 3`` uint8 array (BGR by default, as OpenCV and trackers hand it over).
            boxes_xyxy: ``[N, 4]`` pixel boxes ``x1, y1, x2, y2`` (extra columns such as scores are
                ignored); clipped to the frame, then the crop covers every touched pixel.
            cam_label: as in :meth:`__call__`.

        Raises:
            InputError: a frame that is not ``H x W x 3`` uint8, boxes not ``[N, >=4]``, or a box that is
                non-finite or has no area inside the frame (its index and coordinates are named).
        """
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise InputError(f"frame must be an H x W x 3 uint8 array, got "
                             f"{getattr(frame, 'shape', type(frame).__name__)} {getattr(frame, 'dtype', '')}")
        boxes = torch.as_tensor(np.asarray(boxes_xyxy, dtype=np.float64) if not isinstance(boxes_xyxy, torch.Tensor)
                                else boxes_xyxy.detach().cpu().double())
        if boxes.numel() == 0:
            return torch.empty(0, self.feat_dim)
        if boxes.dim() != 2 or boxes.shape[1] < 4:
            raise InputError(f"boxes_xyxy must be [N, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
        boxes = boxes[:, :4]
        h, w = frame.shape[:2]
        crops = []
        for i, box in enumerate(boxes.tolist()):
            if not all(np.isfinite(box)):
                raise InputError(f"box {i} {box} is not finite")
            x1, x2 = (min(max(v, 0.0), w) for v in (box[0], box[2]))
            y1, y2 = (min(max(v, 0.0), h) for v in (box[1], box[3]))
            left, top, right, bottom = int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2))
            if x2 <= x1 or y2 <= y1:
                raise InputError(f"box {i} (x1, y1, x2, y2) = {box} has no area inside the {w} x {h} frame; boxes need "
                                 f"x2 > x1 and y2 > y1 and must overlap the frame")
            crops.append(frame[top:bottom, left:right])
        feats = self._run((self._prepare(c, bgr, i) for i, c in enumerate(crops)), len(crops), cam_label, view_label)
        return F.normalize(feats, dim=1)


class BoxMOTAdapter:
    """A BoxMOT re-ID backend made of a :class:`FeatureExtractor`: ``get_features(xyxys, img) -> [N, D]``.

    BoxMOT's appearance trackers (BoT-SORT, StrongSORT, DeepOCSORT, ...) call ``model.get_features(xyxys,
    img)`` on their re-ID model once per frame with the frame (BGR) and its detections, and expect an
    ``[N, D]`` float array of L2-normalised features; replace that model with this object::

        tracker = BotSort(reid_weights=Path("osnet_x0_25_msmt17.pt"), device="cpu", half=False)
        tracker.model = BoxMOTAdapter(FeatureExtractor("vit_b16", weights="model.pth"), cam_label="none")

    Args:
        extractor: the extractor that embeds the crops.
        cam_label: the camera label (or ``"mean"`` / ``"none"``) for every crop; required when the model
            has a camera/view table, as in :meth:`FeatureExtractor.__call__`.
    """

    def __init__(self, extractor: FeatureExtractor, cam_label: CamLabel = None) -> None:
        if cam_label is not None and not isinstance(cam_label, (int, str)):
            raise InputError(f"cam_label of a BoxMOTAdapter is one camera for every crop (an int, 'mean' or 'none'), "
                             f"got {type(cam_label).__name__}")
        extractor._labels(cam_label, None, 0)          # a camera model without cam_label: the error naming the choices
        self.extractor = extractor
        self.cam_label = cam_label

    def get_features(self, xyxys: np.ndarray, img: np.ndarray) -> np.ndarray:
        """Boxes ``[N, 4]`` (xyxy) in the BGR frame ``img`` -> L2-normalised features ``[N, D]`` float32."""
        return self.extractor.from_boxes(img, xyxys, bgr=True, cam_label=self.cam_label).numpy()
