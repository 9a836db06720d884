"""Pieces both backbones share: grid arithmetic, image checks, the camera/view (SIE) row lookup and the
block stack's runner (:class:`BlockBackbone`)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from operator import attrgetter
from typing import ClassVar, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from reid_ms._validate import positive_int, real_number
from reid_ms.dispatch import block_path, record
from reid_ms.errors import ConfigError, InputError
from reid_ms.kernels.blocks import BlockParams, packed_weights_for, run_fused
from reid_ms.kernels.compiled import run_compiled

Label = Union[torch.Tensor, int, Sequence[int], None]


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``16 -> (16, 16)``; ``(256, 128) -> (256, 128)``; anything else is a :class:`ConfigError`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise ConfigError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


def grid_size(img_size: tuple[int, int], patch_size: tuple[int, int], stride_size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid ``(H, W)`` of a strided, unpadded patch convolution: ``(img - patch) // stride + 1``."""
    for what, val in (("img_size", img_size), ("patch_size", patch_size), ("stride_size", stride_size)):
        if min(val) < 1:
            raise ConfigError(f"{what} must be positive, got {val}")
    if img_size[0] < patch_size[0] or img_size[1] < patch_size[1]:
        raise ConfigError(f"img_size {img_size} is smaller than patch_size {patch_size}: no patch fits")
    return tuple((i - p) // s + 1 for i, p, s in zip(img_size, patch_size, stride_size))  # type: ignore[return-value]


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast (meta)
        return False


def check_images(images: torch.Tensor, in_chans: int, img_size: tuple[int, int], owner: str,
                 dtype: torch.dtype | None = None) -> None:
    """Raise :class:`InputError` unless ``images`` is a float ``[B, in_chans, *img_size]`` batch.

    With ``dtype`` (the model's parameter dtype) the images must have it too, unless autocast is on for
    their device and they are not float64 (autocast casts the others per operation). Images are not
    cast silently: a float64 batch from NumPy or an fp16 batch meant for ``model.half()`` is named in
    the error instead.
    """
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{owner} expects a tensor of images [B, {in_chans}, {img_size[0]}, {img_size[1]}], "
                         f"got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"{owner} expects images [B, C, H, W], got a {images.dim()}-D tensor of shape "
                         f"{tuple(images.shape)}; add a batch dimension with images.unsqueeze(0)")
    if not images.is_floating_point():
        raise InputError(f"{owner} expects floating-point images (normalised), got dtype {images.dtype}; "
                         f"convert with images.float() and normalise")
    b, c, h, w = images.shape
    if b == 0:
        raise InputError(f"{owner} got an empty batch (shape {tuple(images.shape)})")
    if c != in_chans:
        raise InputError(f"{owner} was built with in_chans={in_chans}, got images with {c} channels "
                         f"(shape {tuple(images.shape)})")
    if (h, w) != tuple(img_size):
        raise InputError(f"{owner} was built for images of {img_size[0]}x{img_size[1]}, got {h}x{w}; "
                         f"resize the images or build the model with img_size=({h}, {w})")
    # autocast casts float16 / bfloat16 / float32 per operation but leaves float64 alone
    cast_by_autocast = images.dtype != torch.float64 and _autocast_on(images.device.type)
    if dtype is not None and images.dtype != dtype and not cast_by_autocast:
        raise InputError(f"{owner} holds {dtype} weights, got images of dtype {images.dtype}; convert them with "
                         f"images.to({dtype}) or run the model under torch.autocast")


def side_info_rows(camera_num: int, view_num: int) -> int:
    """Rows of the camera/view table: ``camera_num * view_num`` with both, else the one given, else 0."""
    for name, value in (("camera_num", camera_num), ("view_num", view_num)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an int >= 0 (0: no table), got {value!r}")
    if camera_num < 0 or view_num < 0:
        raise ConfigError(f"camera_num and view_num must be >= 0, got {camera_num} and {view_num}")
    if camera_num > 0 and view_num > 0:
        return camera_num * view_num
    return max(camera_num, view_num)


def _check_int64(value: int, name: str) -> None:
    if not -(2 ** 63) <= value < 2 ** 63:
        raise InputError(f"{name} holds {value}, which does not fit a 64-bit integer; labels are 0-based "
                         f"camera/view indices")


def _as_labels(label: Label, name: str, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(label, torch.Tensor):
        if label.is_floating_point() or label.is_complex() or label.dtype == torch.bool:
            raise InputError(f"{name} must hold integer labels, got a tensor of dtype {label.dtype}; "
                             f"pass {name}.long()")
        label = label.to(device=device, dtype=torch.long)
    elif isinstance(label, int) and not isinstance(label, bool):
        _check_int64(label, name)
        label = torch.full((batch,), label, dtype=torch.long, device=device)
    elif isinstance(label, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in label):
        for v in label:
            _check_int64(v, name)
        label = torch.tensor(list(label), dtype=torch.long, device=device)
    else:
        raise InputError(f"{name} must be an int, a sequence of ints or an integer tensor, got {label!r}")
    if label.dim() == 0:
        label = label.expand(batch)
    if label.dim() != 1 or label.shape[0] != batch:
        raise InputError(f"{name} must hold one label per image ({batch}), got shape {tuple(label.shape)}")
    return label


def _check_range(label: torch.Tensor, name: str, count: int, count_name: str) -> None:
    # Reading the values back forces a sync (and a graph break under torch.compile), so compiled graphs
    # skip it; eager calls, where users make their mistakes, always check.
    if torch.compiler.is_compiling():
        return
    low, high = int(label.min()), int(label.max())
    if low < 0 or high >= count:
        raise InputError(f"{name} must lie in [0, {count - 1}] for a model built with {count_name}={count}, "
                         f"got values from {low} to {high}; labels are 0-based")


def side_info_index(
    cam_label: Label, view_label: Label, camera_num: int, view_num: int, batch: int, device: torch.device,
    owner: str,
) -> torch.Tensor | None:
    """Row of the camera/view table for each image, ``[B]`` long, or ``None`` for a model without a table.

    With both tables the row is ``cam * view_num + view``; with one, that label (TransReID's SIE rule).
    Labels a model needs but was not given, and labels it was not built for, are :class:`InputError`.
    """
    for label, name, num, num_name in ((cam_label, "cam_label", camera_num, "camera_num"),
                                       (view_label, "view_label", view_num, "view_num")):
        if num == 0 and label is not None:
            raise InputError(f"{owner} was built with {num_name}=0 (no table for {name}) but got {name}; "
                             f"build it with {num_name}=<number of {name.split('_')[0]}s> to use them, "
                             f"or call it without {name}")
        if num > 0 and label is None:
            raise InputError(f"{owner} was built with {num_name}={num} and needs {name} "
                             f"(one integer in [0, {num - 1}] per image)")
    if camera_num == 0 and view_num == 0:
        return None
    cam = view = None
    if camera_num > 0:
        cam = _as_labels(cam_label, "cam_label", batch, device)
        _check_range(cam, "cam_label", camera_num, "camera_num")
    if view_num > 0:
        view = _as_labels(view_label, "view_label", batch, device)
        _check_range(view, "view_label", view_num, "view_num")
    if cam is not None and view is not None:
        return cam * view_num + view
    return cam if cam is not None else view


def check_transformer(owner: str, width: tuple[str, int], heads: tuple[str, int], mlp_ratio: float, example: str,
                      **sizes: int) -> None:
    """:class:`ConfigError` unless the width, head count and ``sizes`` are positive ints, the heads divide the
    width and ``mlp_ratio`` is a positive number; ``width`` and ``heads`` are ``(argument name, value)``,
    ``example`` a valid pair for the message."""
    for name, value in (width, heads, *sizes.items()):
        positive_int(value, name, owner=owner)
    if width[1] % heads[1]:
        raise ConfigError(f"{owner}: {width[0]}={width[1]} is not divisible by {heads[0]}={heads[1]}; choose a "
                          f"head count that divides the width ({example})")
    if real_number(mlp_ratio, "mlp_ratio", owner=owner) <= 0:
        raise ConfigError(f"{owner}: mlp_ratio must be positive, got {mlp_ratio!r}")


class BlockBackbone(nn.Module, abc.ABC):
    """An image backbone whose tokens go through a stack of pre-norm transformer blocks.

    The constructor checks and keeps the patch geometry (``img_size``, ``patch_size``, ``stride_size``,
    ``grid_size``, ``num_patches``, ``in_chans``) and the camera/view settings (``camera_num``,
    ``view_num``, ``sie_coef``); :meth:`_side_info` checks a call's images and labels.
    :meth:`forward_blocks` asks :func:`reid_ms.dispatch.block_path` how to run the blocks (the same rules
    for every backbone, eager or compiled) and runs that path. A subclass provides :meth:`block_stack`,
    :attr:`block_fields` and :attr:`activation`.
    """

    activation = "gelu"  # the MLP's: "gelu" or "quick_gelu"
    # Dotted names inside a block of BlockParams' fields, in order; the attention is `attn`, with `num_heads`.
    block_fields: ClassVar[tuple[str, ...]]

    def __init__(self, img_size: int | Sequence[int], patch_size: int | Sequence[int],
                 stride_size: int | Sequence[int], in_chans: int, camera_num: int, view_num: int,
                 sie_coef: float) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.fused_inference = True
        self.img_size = pair(img_size, "img_size")
        self.patch_size = pair(patch_size, "patch_size")
        self.stride_size = pair(stride_size, "stride_size")
        self.grid_size = grid_size(self.img_size, self.patch_size, self.stride_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.in_chans = positive_int(in_chans, "in_chans", owner=type(self).__name__)
        self.table_rows = side_info_rows(camera_num, view_num)  # 0: no camera/view table
        self.camera_num, self.view_num = camera_num, view_num
        self.sie_coef = real_number(sie_coef, "sie_coef", owner=type(self).__name__)

    @abc.abstractmethod
    def block_stack(self) -> nn.Sequential:
        """The blocks, in order."""

    def block_params(self, block: nn.Module) -> BlockParams:
        """``block``'s tensors for the fused path."""
        return BlockParams(*attrgetter(*self.block_fields)(block))

    def block_heads(self, block: nn.Module) -> int:
        """``block``'s attention head count."""
        return int(attrgetter("attn.num_heads")(block))

    def _side_info(self, images: torch.Tensor, cam_label: Label, view_label: Label, table: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor | None:
        """Check ``images`` (:func:`check_images`; ``dtype``: the weights') and the labels
        (:func:`side_info_index`); return each image's row of ``table`` times ``sie_coef``, ``[B, 1, D]``
        (``None`` for a model without a table)."""
        owner = type(self).__name__
        check_images(images, self.in_chans, self.img_size, owner, dtype)
        row = side_info_index(cam_label, view_label, self.camera_num, self.view_num, images.shape[0],
                              images.device, owner)
        if row is None or table is None:
            return None
        return self.sie_coef * table[row].flatten(1).unsqueeze(1)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (while autograd records) to save memory."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def set_fused_inference(self, enable: bool = True) -> None:
        """Run CPU fp32 inference through oneDNN's fused kernels (on by default; same outputs within float
        rounding). Off: the blocks' own modules. Nothing is cached either way."""
        self.fused_inference = enable

    def forward_blocks(self, x: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Run ``blocks[:end]`` (all by default) on tokens ``[B, T, D]``; no final norm."""
        blocks = self.block_stack()
        if end is not None:
            blocks = blocks[:end]
        if len(blocks) == 0:
            return x
        first = self.block_params(blocks[0])
        choice = block_path(x, self, blocks, first.qkv_weight)
        record(choice)
        if choice.blocks == "module":
            return blocks(x)
        if choice.blocks == "checkpointed":
            for block in blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        # eval-mode blocks are exactly this (drop path, dropout and layer scale are identities)
        params = [first] + [self.block_params(b) for b in blocks[1:]]
        heads = self.block_heads(blocks[0])
        if choice.blocks == "fused_op":
            return run_compiled(x, params, heads, self.activation)
        return run_fused(x, params, heads, self.activation, packed_weights_for(self))
