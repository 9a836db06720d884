"""Property-test helpers for re-ID backbones and necks: hypothesis strategies and contract checks.

A downstream project that writes its own backbone or neck (or subclasses reid_ms's) tests it against the
same contract as :class:`~reid_ms.VitTrans`, :class:`~reid_ms.ClipVisual` and
:class:`~reid_ms.MultiScaleSlidingWindow`::

    from hypothesis import given, settings
    from reid_ms import testing as rt

    @settings(derandomize=True, deadline=None, max_examples=10)
    @given(geo=rt.geometries(max_side=64), width=rt.widths(8, 32, multiple_of=4), table=rt.label_tables())
    def test_my_backbone(geo, width, table):
        rt.check_backbone(MyBackbone(img_size=geo.img_size, patch_size=geo.patch_size,
                                     stride_size=geo.stride_size, dim=width,
                                     camera_num=table[0], view_num=table[1]))

The strategies draw what the library's shapes depend on (image sizes, patch and stride, patch grids,
token widths, camera/view table sizes, window scales); :func:`grid_size` is the patch-grid formula the
backbones use. :func:`check_backbone` and :func:`check_neck` raise ``AssertionError`` with a message
naming the broken rule, so they read as test failures.

Needs hypothesis: ``pip install "reid-ms[testing]"``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from reid_ms.backbones._common import grid_size as _grid_size
from reid_ms.backbones._common import pair

try:
    from hypothesis import assume
    from hypothesis import strategies as st
except ImportError as exc:  # hypothesis is a test-time dependency, not needed to run models
    raise ImportError('reid_ms.testing needs hypothesis: pip install "reid-ms[testing]"') from exc

__all__ = [
    "Geometry", "grid_size",
    "image_sizes", "patch_strides", "geometries", "grids", "widths", "label_tables", "labels", "scale_sets",
    "check_backbone", "check_neck",
]


def grid_size(img_size: int | Sequence[int], patch_size: int | Sequence[int] = 16,
              stride_size: int | Sequence[int] = 16) -> tuple[int, int]:
    """Patch grid ``(H, W)`` of a backbone: ``H = (img_h - patch_h) // stride_h + 1``, likewise ``W``.

    The formula :class:`~reid_ms.VitTrans` and :class:`~reid_ms.ClipVisual` use (an unpadded, strided
    patch convolution); ints mean square. A size smaller than the patch is a :class:`~reid_ms.ConfigError`.
    """
    return _grid_size(pair(img_size, "img_size"), pair(patch_size, "patch_size"),
                      pair(stride_size, "stride_size"))


class Geometry(NamedTuple):
    """An image size with a patch and stride that fit it, and the grid they give."""

    img_size: tuple[int, int]
    patch_size: int
    stride_size: int

    @property
    def grid_size(self) -> tuple[int, int]:
        """``(H, W)`` by :func:`grid_size`."""
        return grid_size(self.img_size, self.patch_size, self.stride_size)

    @property
    def num_tokens(self) -> int:
        """``1 + H * W``: the CLS and the patch tokens a backbone returns."""
        h, w = self.grid_size
        return 1 + h * w


def image_sizes(min_side: int = 16, max_side: int = 96) -> st.SearchStrategy[tuple[int, int]]:
    """``(height, width)`` with each side in ``[min_side, max_side]``, not necessarily square."""
    side = st.integers(min_side, max_side)
    return st.tuples(side, side)


def patch_strides(patch_sizes: Sequence[int] = (4, 8, 16),
                  overlapping_only: bool = True) -> st.SearchStrategy[tuple[int, int]]:
    """``(patch, stride)``: a patch side from ``patch_sizes`` and a stride in ``[1, patch]`` (overlapping or
    touching patches, as re-ID backbones use: 16/16, 16/12); with ``overlapping_only=False`` strides up to
    twice the patch (gaps between patches) too."""
    def stride_for(patch: int) -> st.SearchStrategy[tuple[int, int]]:
        top = patch if overlapping_only else 2 * patch
        return st.tuples(st.just(patch), st.integers(1, top))
    return st.sampled_from(list(patch_sizes)).flatmap(stride_for)


@st.composite
def geometries(draw: Any, min_side: int = 16, max_side: int = 96, patch_sizes: Sequence[int] = (4, 8, 16),
               max_tokens: int = 257) -> Geometry:
    """A :class:`Geometry`: image size, patch and stride with the patch fitting the image and at most
    ``max_tokens`` tokens (``1 + H*W``), so a backbone built from it stays quick to run."""
    patch, stride = draw(patch_strides(patch_sizes))
    low = max(min_side, patch)
    # a side of s pixels gives (s - patch) // stride + 1 patches, so n patches at most means
    # s <= patch + n * stride - 1; the narrowest image already has min_grid patches across
    min_grid = (low - patch) // stride + 1
    h_max = min(max_side, patch + ((max_tokens - 1) // min_grid) * stride - 1)
    assume(low <= h_max)
    h = draw(st.integers(low, h_max))
    grid_h = (h - patch) // stride + 1
    w = draw(st.integers(low, min(max_side, patch + ((max_tokens - 1) // grid_h) * stride - 1)))
    return Geometry((h, w), patch, stride)


def grids(max_side: int = 24, min_side: int = 1) -> st.SearchStrategy[tuple[int, int]]:
    """Patch grids ``(H, W)``, each side in ``[min_side, max_side]``: what a neck must take."""
    return image_sizes(min_side, max_side)


def widths(min_value: int = 1, max_value: int = 64, multiple_of: int = 1) -> st.SearchStrategy[int]:
    """Token widths in ``[min_value, max_value]`` divisible by ``multiple_of`` (e.g. the head count)."""
    low = -(-min_value // multiple_of)
    high = max_value // multiple_of
    if low > high:
        raise ValueError(f"no multiple of {multiple_of} lies in [{min_value}, {max_value}]")
    return st.integers(low, high).map(lambda k: k * multiple_of)


def label_tables(max_cameras: int = 8, max_views: int = 4) -> st.SearchStrategy[tuple[int, int]]:
    """``(camera_num, view_num)``: no table, cameras only, views only, or both (rows ``cam * view_num +
    view``)."""
    return st.tuples(st.integers(0, max_cameras), st.integers(0, max_views))


def labels(camera_num: int, view_num: int,
           batch_size: int) -> st.SearchStrategy[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """``(cam_label, view_label)`` for a batch: ``[B]`` long tensors in range, ``None`` where the model has
    no table for that label."""
    def one(count: int) -> st.SearchStrategy[torch.Tensor | None]:
        if count == 0:
            return st.none()
        values = st.lists(st.integers(0, count - 1), min_size=batch_size, max_size=batch_size)
        return values.map(lambda v: torch.tensor(v, dtype=torch.long))
    return st.tuples(one(camera_num), one(view_num))


def scale_sets(max_scale: int = 16, max_size: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    """Window sides of a multi-scale neck: 1 to ``max_size`` distinct ints in ``[1, max_scale]``, sorted."""
    return st.lists(st.integers(1, max_scale), min_size=1, max_size=max_size, unique=True).map(
        lambda s: tuple(sorted(s)))


# --- contract checks ------------------------------------------------------------------------------------


def _fail(owner: str, message: str) -> AssertionError:
    return AssertionError(f"{owner}: {message}")


def _int_pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    return None


def _refuses(call: Any) -> bool:
    try:
        call()
    except Exception:  # noqa: BLE001 - any error counts as refusing; silently computing is the fault
        return True
    return False


def _same_per_image(batched: torch.Tensor, single: list[torch.Tensor], rtol: float) -> bool:
    scale = float(batched.abs().max()) or 1.0
    return all(torch.allclose(batched[i:i + 1], s, rtol=rtol, atol=rtol * scale) for i, s in enumerate(single))


def check_backbone(module: nn.Module, batch_size: int = 2, seed: int = 0, rtol: float = 1e-4) -> None:
    """Check ``module`` against the backbone contract; raise ``AssertionError`` naming the first broken rule.

    The module needs the attributes ``img_size`` ``(h, w)``, ``grid_size`` ``(H, W)`` and ``out_dim``
    (``in_chans`` defaults to 3; ``patch_size`` / ``stride_size``, when present, must give ``grid_size`` by
    :func:`grid_size`; ``camera_num`` / ``view_num``, when present, are its table sizes). Checked, in eval
    mode, with ``batch_size`` random images ``[B, in_chans, h, w]``:

    - ``module(images, cam_label=..., view_label=...)`` returns a finite ``[B, 1 + H*W, out_dim]`` tensor;
    - every token depends on the images (a token equal for two different batches was dropped or padded)
      and no two tokens of an image are equal (a copied token stands in for a dropped one);
    - every pixel under some patch reaches the output (pixels that never do belong to dropped patches or
      a cropped image);
    - each image's tokens do not depend on the others in the batch;
    - with a table: a missing label, a label of ``-1`` and one past the last row are refused (an error is
      raised), and two different labels give different tokens; without one (``camera_num == 0``), a
      label is refused.

    The module is left in the train/eval mode it came in; its parameters are not changed.
    """
    owner = type(module).__name__
    for attr in ("img_size", "grid_size", "out_dim"):
        if not hasattr(module, attr):
            raise _fail(owner, f"has no {attr!r} attribute; a backbone states its input size (img_size), "
                               f"its patch grid (grid_size) and its token width (out_dim)")
    img_size, grid, out_dim = _int_pair(module.img_size), _int_pair(module.grid_size), module.out_dim
    if img_size is None or grid is None:
        raise _fail(owner, f"img_size and grid_size must be pairs of ints, got {module.img_size!r} and "
                           f"{module.grid_size!r}")
    patch, stride = getattr(module, "patch_size", None), getattr(module, "stride_size", None)
    if patch is not None and stride is not None:
        want = grid_size(img_size, patch, stride)
        if grid != want:
            raise _fail(owner, f"grid_size is {grid} but img_size {img_size}, patch_size {patch} "
                               f"and stride_size {stride} give {want} "
                               f"((img - patch) // stride + 1)")
    in_chans = int(getattr(module, "in_chans", 3))
    camera_num, view_num = int(getattr(module, "camera_num", 0)), int(getattr(module, "view_num", 0))
    tables = hasattr(module, "camera_num") or hasattr(module, "view_num")
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)

    def images() -> torch.Tensor:
        return torch.randn(batch_size, in_chans, *img_size, generator=gen).to(device, dtype)

    def label_kwargs(cam: int, view: int) -> dict[str, Any]:
        return {"cam_label": torch.full((batch_size,), cam, dtype=torch.long, device=device) if camera_num else None,
                "view_label": torch.full((batch_size,), view, dtype=torch.long, device=device) if view_num else None}

    expected = (batch_size, 1 + grid[0] * grid[1], out_dim)
    was_training = module.training
    module.eval()
    try:
        x, y = images(), images()
        kwargs = label_kwargs(0, 0)
        with torch.no_grad():
            try:
                out = module(x, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported as the contract failure it is
                raise _fail(owner, f"raised {type(exc).__name__} on valid images and labels: {exc}") from exc
            if not isinstance(out, torch.Tensor):
                raise _fail(owner, f"forward returned {type(out).__name__}, not a tensor of tokens")
            if tuple(out.shape) != expected:
                raise _fail(owner, f"returned tokens of shape {tuple(out.shape)}; expected [B, 1 + H*W, out_dim] = "
                                   f"{list(expected)} for grid_size {grid} (CLS first, then every patch)")
            if not bool(torch.isfinite(out).all()):
                raise _fail(owner, "returned non-finite tokens for random images")
            other = module(y, **kwargs)
            same = (out == other).flatten(2).all(-1).all(0)
            if bool(same.any()):
                index = int(same.nonzero()[0])
                raise _fail(owner, f"token {index} is identical for two different batches of images: it does not "
                                   f"depend on the image (a dropped or padded token)")
            distinct = torch.unique(out[0].flatten(1), dim=0).shape[0]
            if distinct < out.shape[1]:
                raise _fail(owner, f"returns {out.shape[1] - distinct} duplicated token(s) for random images: "
                                   f"tokens copied in place of dropped ones")
            single = [module(x[i:i + 1], **{k: None if v is None else v[i:i + 1] for k, v in kwargs.items()})
                      for i in range(batch_size)]
            if not _same_per_image(out, single, rtol):
                raise _fail(owner, "an image's tokens change with the other images of its batch; each image "
                                   "must be processed on its own (batch and token dimensions mixed up?)")
        _check_pixels_reach_output(module, owner, x, kwargs, grid)
        if tables:
            _check_labels(module, owner, x, camera_num, view_num, label_kwargs)
    finally:
        module.train(was_training)


def _check_pixels_reach_output(module: nn.Module, owner: str, x: torch.Tensor, kwargs: dict[str, Any],
                               grid: tuple[int, int]) -> None:
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        out = module(x, **kwargs)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        (grad,) = torch.autograd.grad((out * probe).sum(), x)
    patch, stride = getattr(module, "patch_size", None), getattr(module, "stride_size", None)
    if patch is None or stride is None:
        rows, cols = x.shape[2], x.shape[3]
    else:  # pixels right of / below the last patch are legitimately unused
        (ph, pw), (sh, sw) = pair(patch, "patch_size"), pair(stride, "stride_size")
        rows, cols = (grid[0] - 1) * sh + ph, (grid[1] - 1) * sw + pw
    dead = (grad.abs().sum(dim=(0, 1))[:rows, :cols] == 0).nonzero()
    if len(dead):
        raise _fail(owner, f"the pixel at row {int(dead[0, 0])}, column {int(dead[0, 1])} lies under a patch but "
                           f"never reaches the output (zero gradient): patches there are dropped or the image is "
                           f"cropped")


def _check_labels(module: nn.Module, owner: str, x: torch.Tensor, camera_num: int, view_num: int,
                  label_kwargs: Callable[[int, int], dict[str, Any]]) -> None:
    with torch.no_grad():
        for name, count in (("cam_label", camera_num), ("view_label", view_num)):
            valid = label_kwargs(0, 0)
            if count == 0:
                given = {**valid, name: torch.zeros(x.shape[0], dtype=torch.long, device=x.device)}
                if not _refuses(lambda: module(x, **given)):
                    raise _fail(owner, f"was built without a table for {name} ({name.split('_')[0]}_num=0) but "
                                       f"accepted {name}=0 instead of refusing it")
                continue
            if not _refuses(lambda: module(x, **{**valid, name: None})):
                raise _fail(owner, f"has a table of {count} rows for {name} but ran without {name}")
            for bad in (-1, count):
                wrong = {**valid, name: torch.full((x.shape[0],), bad, dtype=torch.long, device=x.device)}
                if not _refuses(lambda: module(x, **wrong)):
                    raise _fail(owner, f"accepted {name}={bad}, outside [0, {count - 1}], instead of refusing it")
            if count > 1:
                last = label_kwargs(count - 1 if name == "cam_label" else 0, count - 1 if name == "view_label" else 0)
                if torch.equal(module(x, **valid), module(x, **last)):
                    raise _fail(owner, f"{name}=0 and {name}={count - 1} give identical tokens: the label is "
                                       f"ignored (or its table rows are equal, e.g. all zero)")


def _randomise_zero_parameters(module: nn.Module, seed: int) -> nn.Module:
    """A copy of ``module`` whose all-zero floating parameters are random; ``module`` itself if it has none."""
    if not any(p.is_floating_point() and not bool(p.any()) for p in module.parameters()):
        return module
    module = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.1)
    return module


def check_neck(module: nn.Module, grid_sizes: Sequence[tuple[int, int]] = ((1, 1), (3, 5), (16, 8), (21, 10)),
               batch_size: int = 2, seed: int = 0, rtol: float = 1e-4) -> None:
    """Check ``module`` against the neck contract; raise ``AssertionError`` naming the first broken rule.

    The module needs a ``feat_dim`` attribute (the token width ``D``) and is called
    ``module(tokens, grid_size=(H, W))``. For each grid in ``grid_sizes`` (by default: one patch, grids
    smaller than and not divisible by common windows, and the 256x128 grids at stride 16 and 12), with
    random tokens ``[B, 1 + H*W, D]``, in eval mode:

    - the result is finite and has the tokens' shape and dtype;
    - every patch token reaches the CLS (a non-zero gradient of the output CLS on each): nothing cropped;
    - each sample's result does not depend on the others in the batch;
    - tokens that do not fit the grid (one token too many, or a grid one row taller) are refused.

    A neck that starts at zero (as reid_ms's do, so that a fresh neck returns the backbone's CLS) would hide
    whether the CLS sees the patches, so the checks run on a copy whose all-zero parameters are random.
    """
    owner = type(module).__name__
    width = getattr(module, "feat_dim", None)
    if not isinstance(width, int):
        raise _fail(owner, "has no int 'feat_dim' attribute (the token width it takes)")
    neck = _randomise_zero_parameters(module, seed)
    param = next(neck.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    was_training = neck.training
    neck.eval()
    try:
        for h, w in grid_sizes:
            tokens = torch.randn(batch_size, 1 + h * w, width, generator=gen).to(device, dtype)
            with torch.no_grad():
                out = neck(tokens, grid_size=(h, w))
                if not isinstance(out, torch.Tensor) or out.shape != tokens.shape or out.dtype != tokens.dtype:
                    got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise _fail(owner, f"on grid ({h}, {w}) returned {got}; a neck keeps the tokens' shape "
                                       f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
                if not bool(torch.isfinite(out).all()):
                    raise _fail(owner, f"returned non-finite tokens on grid ({h}, {w})")
                single = [neck(tokens[i:i + 1], grid_size=(h, w)) for i in range(batch_size)]
                if not _same_per_image(out, single, rtol):
                    raise _fail(owner, f"on grid ({h}, {w}) a sample's result changes with the other samples of "
                                       f"its batch")
                for bad, grid in ((torch.cat([tokens, tokens[:, -1:]], 1), (h, w)), (tokens, (h + 1, w))):
                    if not _refuses(lambda: neck(bad, grid_size=grid)):
                        raise _fail(owner, f"accepted {bad.shape[1]} tokens with grid_size {grid}; it must refuse "
                                           f"tokens that are not 1 + H*W")
            probe_in = tokens.clone().requires_grad_(True)
            with torch.enable_grad():
                cls = neck(probe_in, grid_size=(h, w))[:, 0]
                probe = torch.randn(cls.shape, generator=gen).to(cls)
                (grad,) = torch.autograd.grad((cls * probe).sum(), probe_in)
            dead = (grad[:, 1:].abs().sum(dim=(0, 2)) == 0).nonzero()
            if len(dead):
                index = int(dead[0])
                raise _fail(owner, f"on grid ({h}, {w}) the patch token at row {index // w}, column {index % w} "
                                   f"never reaches the CLS: the neck drops or crops part of the grid")
    finally:
        neck.train(was_training)
