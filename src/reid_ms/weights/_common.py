"""What the weight loaders share: the load report, the position-grid resize and the all-or-nothing load."""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from reid_ms.errors import CheckpointError
from reid_ms.weights._io import read_checkpoint

if TYPE_CHECKING:  # annotations only: the loaders need no backbone class at run time
    from reid_ms.backbones.clip import ClipVisual
    from reid_ms.backbones.vit import VitTrans

    # the backbones whose position grid and camera/view table a file is fitted to
    GridBackbone: TypeAlias = VitTrans | ClipVisual

logger = logging.getLogger("reid_ms.weights")


@dataclass
class LoadReport:
    """What a loader did with a checkpoint.

    Attributes:
        path: the file that was read.
        format: its container (``torch.save``, ``npz``, ``safetensors``, ``torchscript``).
        kind: the checkpoint family recognised from its keys (``imagenet``, ``deit``, ``transreid``,
            ``reid_ms`` for a model saved by this library, ...).
        loaded: model keys filled from the file.
        ignored: file keys not used, each mapped to the reason (classifier head, text tower, ...).
        resized: model keys whose tensor was resized, with ``(old_shape, new_shape)``.
        kept_init: model keys the file lacks that keep their initialisation (the camera/view table).
    """

    path: str
    format: str
    kind: str
    loaded: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    kept_init: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.kind} checkpoint ({self.format}); loaded {len(self.loaded)} tensors"]
        lines += [f"  resized {k}: {list(a)} -> {list(b)}" for k, (a, b) in self.resized.items()]
        lines += [f"  kept initialisation: {k} (not in the file)" for k in self.kept_init]
        if self.ignored:
            lines.append(f"  ignored: {_shortlist([f'{k} ({why})' for k, why in self.ignored.items()])}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"LoadReport(kind={self.kind!r}, format={self.format!r}, loaded={len(self.loaded)}, "
                f"ignored={len(self.ignored)}, resized={list(self.resized)}, kept_init={len(self.kept_init)}, "
                f"path={self.path!r})")

    def _repr_html_(self) -> str:
        # a notebook cell shows a summary table, not every key
        rows = [("file", self.path), ("checkpoint", f"{self.kind} ({self.format})"),
                ("loaded", f"{len(self.loaded)} tensors")]
        rows += [("resized", f"{html.escape(k)}: {list(a)} &rarr; {list(b)}") for k, (a, b) in self.resized.items()]
        if self.kept_init:
            rows.append(("kept initialisation", _shortlist(self.kept_init)))
        if self.ignored:
            rows.append(("ignored", _shortlist(list(self.ignored))))
        body = "".join(f"<tr><th style='text-align:left'>{a}</th><td>{b if a == 'resized' else html.escape(b)}</td></tr>"
                       for a, b in rows)
        return f"<table><caption>LoadReport</caption>{body}</table>"


def _shortlist(names: list[str], shown: int = 8) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


# Floor of the memory budget, so tiny models still read the small extras of real files (metadata, heads).
_BUDGET_SLACK = 1 << 20


def memory_budget(model: nn.Module) -> int:
    """Bytes a load may allocate beyond the model: twice the model's own tensors, plus 1 MiB.

    Every size a file declares (zip members, storages, position tables, converted kernels) is compared
    with this before anything proportional to it is read or allocated.
    """
    own = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 2 * own + _BUDGET_SLACK


def check_declared(tensors: dict[str, torch.Tensor], report: LoadReport, budget: int) -> None:
    """Refuse ``tensors`` (what a filter will compute with) when their declared fp32 size exceeds ``budget``.

    A small file can declare a huge tensor as a stride-0 view of one element; only the declared shapes
    tell, and they are read here, before any resize, cast or concatenation materialises a tensor.
    """
    total = sum(t.numel() for t in tensors.values()) * 4
    if total > budget:
        key = max(tensors, key=lambda k: tensors[k].numel())
        raise CheckpointError(f"{report.path!r} ({report.kind}): the tensors to load declare {total / 2**20:.0f} MiB "
                              f"as float32 ({key!r} alone has shape {list(tensors[key].shape)}), more than a "
                              f"checkpoint for this model can need ({budget / 2**20:.0f} MiB); the file is not for "
                              f"this model, or is damaged or hostile")


def square_side(count: int) -> int | None:
    """``s`` when ``count == s * s``, else ``None``."""
    side = math.isqrt(count)
    return side if side * side == count else None


def resize_pos_grid(grid: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    """Resize patch position embeddings ``[old_h * old_w, D]`` to ``[new_h * new_w, D]``.

    Bilinear, ``align_corners=False``, no antialias, computed in float32: TransReID's and CLIP-ReID's
    rule, so a resized model gives their numbers (timm's bicubic + antialias default does not).
    """
    if tuple(old_hw) == tuple(new_hw):
        return grid
    dtype = grid.dtype
    x = grid.float().reshape(1, old_hw[0], old_hw[1], -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=tuple(new_hw), mode="bilinear", align_corners=False, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], -1).to(dtype)


# Image sizes re-ID models are trained at, tried when a stored grid does not fit the model's image size.
_COMMON_IMG_SIZES = ((256, 128), (384, 128), (128, 256), (384, 192), (224, 224), (384, 384))


def grid_hint(model: GridBackbone, count: int) -> str:
    """Builder arguments of ``model``'s patch size that give ``count`` patches, as advice for an error."""
    ph, pw = model.patch_size
    hints = []
    for img in (tuple(model.img_size),) + tuple(s for s in _COMMON_IMG_SIZES if s != tuple(model.img_size)):
        if img[0] < ph or img[1] < pw:
            continue
        for stride in range(max(ph, pw), 0, -1):
            h, w = (img[0] - ph) // stride + 1, (img[1] - pw) // stride + 1
            if h * w == count:
                same_img = img == tuple(model.img_size)
                hints.append(f"stride_size={stride}" + ("" if same_img else f", img_size={img}")
                             + f" (grid {h}x{w})")
    if not hints:
        return (f"no stride or common image size with patch_size={model.patch_size} gives {count} patches; "
                f"build the model with the img_size and stride_size the checkpoint was trained with")
    return "build the model with " + " or ".join(hints[:3])


def fit_position_grid(grid: torch.Tensor, model: GridBackbone, key: str, report: LoadReport) -> torch.Tensor:
    """Patch positions ``[N, D]`` of a file -> ``[H*W, D]`` of ``model`` (with ``grid_size``, ``num_patches``).

    Equal counts are copied as stored (trained re-ID checkpoints keep their training grid; TransReID and
    CLIP-ReID resize only when the shapes differ). A square ImageNet/OpenAI grid is resized with
    :func:`resize_pos_grid`; a non-square grid of another count has no known shape and is an error that
    names the builder arguments that would fit it.
    """
    count = grid.shape[0]
    if count == model.num_patches:
        return grid
    side = square_side(count)
    if side is None:
        h, w = model.grid_size
        raise CheckpointError(
            f"{report.path!r} ({report.kind}): its position table ({key}) holds {count} patch positions (not a "
            f"square grid) and the model has {model.num_patches} ({h}x{w}); a non-square grid of unknown shape "
            f"cannot be resized faithfully: {grid_hint(model, count)}")
    # Resized in float32 whatever the file's dtype; the all-or-nothing load casts to the model's dtype.
    return resize_pos_grid(grid.float(), (side, side), model.grid_size)


def _rows_hint(rows: int) -> str:
    return (f"camera_num={rows} (one table row per camera), or camera_num and view_num with "
            f"camera_num * view_num = {rows} if it was trained with both labels")


def fit_side_table(state: dict[str, torch.Tensor], key: str, model: GridBackbone, report: LoadReport) -> None:
    """Check the camera/view table ``state[key]`` against ``model``'s, or keep the model's when the file has none.

    ImageNet and OpenAI weights have no table: the model's keeps its initialisation (as TransReID and
    CLIP-ReID train it from there) and the report says so. A table the model lacks, or one of another row
    count, is an error naming the ``camera_num`` / ``view_num`` to build with.
    """
    target = model.state_dict()
    if key not in state:
        if key in target:
            state[key] = target[key]
            report.kept_init.append(key)
        return
    rows = state[key].shape[0] if state[key].dim() else 0
    if key not in target:
        raise CheckpointError(
            f"{report.path!r} ({report.kind}) has a camera/view table ({key}, {rows} rows) but the model was "
            f"built without one (camera_num=0, view_num=0); build it with {_rows_hint(rows)}")
    if rows != target[key].shape[0]:
        raise CheckpointError(
            f"{report.path!r} ({report.kind}): the camera/view table ({key}) has {rows} rows in the file but "
            f"{target[key].shape[0]} in the model (camera_num={model.camera_num}, view_num={model.view_num}); "
            f"build it with {_rows_hint(rows)}")


def check_finite(state: dict[str, torch.Tensor], path: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{path!r}: tensor {k!r} holds NaN or infinite values; the file is damaged")


def cast_like(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], path: str,
              kind: str) -> dict[str, torch.Tensor]:
    """``state`` cast to the dtypes of ``target`` (same keys), refusing casts that would change values.

    Floating point goes to floating point (fp16 / bf16 / fp64 files into an fp32 model) and integers to
    integers; an integer, boolean or complex tensor where the model holds floats (or the reverse) means
    the file is not what it claims to be, and non-finite floats mean it is damaged.
    """
    out = {}
    for k, v in state.items():
        want = target[k].dtype
        same_kind = (v.is_floating_point() == want.is_floating_point and not v.is_complex()
                     and (v.dtype == torch.bool) == (want == torch.bool))
        if not same_kind:
            raise CheckpointError(f"{path!r} ({kind}): {k!r} is stored as {v.dtype} but the model holds {want}; "
                                  f"the file is damaged or was not written from a model of this kind")
        out[k] = v.to(dtype=want)
    check_finite(out, path)
    return out


def load_all_or_nothing(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> LoadReport:
    """Copy ``state`` into ``model`` only if it matches every key and shape; the model is untouched otherwise.

    ``state`` must name every tensor of ``model.state_dict()``. Tensors are cast to the dtype of the
    model's own tensor (fp16 OpenAI weights into an fp32 model; see :func:`cast_like`) and values are
    checked to be finite.
    """
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        raise CheckpointError(
            f"{report.path!r} ({report.kind}) does not fit {type(model).__name__}: "
            + (f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''} " if missing else "")
            + (f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} " if unexpected else "")
            + "; check that the model was built with the depth and widths the checkpoint was trained with"
        )
    for k, t in target.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{report.path!r} ({report.kind}): {k!r} has shape {list(state[k].shape)} in the file but "
                f"{list(t.shape)} in the model; build the model with the sizes the checkpoint was trained with"
            )
    cast = cast_like(state, target, report.path, report.kind)
    model.load_state_dict(cast, strict=True)
    report.loaded = sorted(k for k in cast if k not in report.kept_init)
    logger.info("%s", report)
    return report


def load_file(model: nn.Module, path: str | os.PathLike,
              to_state: Callable[[Any, str, str], tuple[dict[str, torch.Tensor], LoadReport]]) -> LoadReport:
    """Read ``path`` (sized against ``model``), map it with ``to_state(checkpoint, path, fmt) -> (state, report)``
    and load all of it into ``model`` or nothing (:func:`load_all_or_nothing`)."""
    path = os.fspath(path)
    checkpoint, fmt = read_checkpoint(path, memory_budget(model))
    return load_all_or_nothing(model, *to_state(checkpoint, path, fmt))
