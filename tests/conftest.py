"""Shared fixtures."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
import torch


def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """Two intra-op threads while the test runs (the per-image attention paths' thread range includes 2;
    a CI machine may have another core count)."""
    yield from _threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: for tiny tensors on a busy two-core machine the OpenMP
    hand-offs of two threads take most of the time (a tiny stage-1 run measured 0.4 s at one thread,
    14 s at two)."""
    yield from _threads(1)


class TinyModels:
    """Registered models at a tiny size, the size picked from the model's spec (its backbone, neck, adapter).

    ``args(name, blocks=None, **extra)``: the ``build`` overrides; ``build(name, seed=0, wake=False,
    randomize=False, **extra)``: the model, built after ``torch.manual_seed(seed)``; with ``wake`` its
    zero-initialised layers (the dense neck's windows, the light neck's pointwise projection) get small
    random values, as after a first optimiser step, so that a test can see them act; with ``randomize``
    every parameter and the BNNeck's statistics do. ``images(batch, seed, img_size=None)``: seeded images of the
    tiny size. ``backbone(kind, ...)``: a bare backbone by kind; ``labels(batch)``: camera/view labels for it.
    """

    # 64x32 at stride 12: a 5 x 2 grid of overlapping patches, which no neck window divides
    IMG = (64, 32)
    BACKBONES = {
        "VitTrans": dict(img_size=IMG, stride_size=12, embed_dim=32, depth=2, num_heads=4),
        "ClipVisual": dict(img_size=IMG, stride_size=12, width=32, layers=2, heads=4, output_dim=24),
    }
    NECK = dict(scales=(2, 4))   # one window wider than the grid's width
    ADAPT_DIM = 40

    def args(self, name: str, *, blocks: int | None = None, **extra) -> dict:
        """``build`` overrides; ``blocks`` sets the backbone's depth (``depth`` / ``layers``)."""
        from reid_ms.registry import get_spec

        spec = get_spec(name)
        args = dict(self.BACKBONES[spec.backbone.__name__])
        if blocks is not None:
            args["depth" if "depth" in args else "layers"] = blocks
        if spec.neck_mode is not None:
            args.update(self.NECK)
        if spec.adapt_dim is not None:
            args["adapt_dim"] = self.ADAPT_DIM
        return {**args, **extra}

    def build(self, name: str, *, seed: int = 0, wake: bool = False, randomize: bool = False,
              **extra) -> torch.nn.Module:
        import reid_ms

        torch.manual_seed(seed)
        model = reid_ms.build(name, **self.args(name, **extra))
        if randomize:
            # every parameter and BatchNorm statistic away from its initialisation: a fresh dense neck is
            # zero and a fresh BNNeck the identity, so a test on a fresh model would not see them act
            with torch.no_grad():
                for param in model.parameters():
                    param.copy_(torch.randn_like(param) * 0.2)
                bn = model.head.bottleneck
                bn.running_mean.copy_(torch.randn_like(bn.running_mean))
                bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
        elif wake and model.neck is not None:
            gen = torch.Generator().manual_seed(seed + 5)
            with torch.no_grad():
                for p in model.neck.parameters():
                    if not p.any():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        return model

    # camera and view table sizes that ``labels`` draws from
    CAMERAS, VIEWS = 3, 2

    def backbone(self, kind: str, *, seed: int = 0, width: int | None = None, blocks: int | None = None,
                 side_info: bool = False, vector_noise: float = 0.0, **extra) -> torch.nn.Module:
        """A tiny ``VitTrans`` (``kind="vit"``, no drop path) or ``ClipVisual`` (``"clip"``), seeded.

        ``width`` / ``blocks`` set ``embed_dim`` / ``width`` and ``depth`` / ``layers``; ``side_info`` adds
        camera and view tables of ``CAMERAS`` x ``VIEWS`` rows (labels from ``labels``); ``vector_noise``
        times Gaussian noise goes onto every 1-D parameter (norms and biases start at 1 and 0, where a
        misplaced scale or bias, or a sample mixed into another's chunk, would not show).
        """
        import reid_ms

        cls = {"vit": reid_ms.VitTrans, "clip": reid_ms.ClipVisual}[kind]
        args = dict(self.BACKBONES[cls.__name__], **({"drop_path_rate": 0.0} if kind == "vit" else {}))
        if width is not None:
            args["embed_dim" if kind == "vit" else "width"] = width
        if blocks is not None:
            args["depth" if kind == "vit" else "layers"] = blocks
        if side_info:
            args.update(camera_num=self.CAMERAS, view_num=self.VIEWS)
        torch.manual_seed(seed)
        model = cls(**{**args, **extra})
        if vector_noise:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 1:
                        p.add_(torch.randn_like(p) * vector_noise)
        return model

    def labels(self, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
        """Seeded ``cam_label`` / ``view_label`` keyword arguments for a ``side_info`` backbone."""
        gen = torch.Generator().manual_seed(seed)
        return dict(cam_label=torch.randint(0, self.CAMERAS, (batch,), generator=gen),
                    view_label=torch.randint(0, self.VIEWS, (batch,), generator=gen))

    def width(self, name: str, **extra) -> int:
        """Width of one token reaching the head (the adapter's, else the backbone's out_dim)."""
        args = self.args(name, **extra)
        return args.get("adapt_dim", args.get("output_dim", args.get("embed_dim")))

    def images(self, batch: int = 3, seed: int = 0, img_size: tuple[int, int] = IMG) -> torch.Tensor:
        return torch.randn(batch, 3, *img_size, generator=torch.Generator().manual_seed(seed))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that nothing listens on now."""
    return _free_port


@pytest.fixture(scope="session")
def tiny() -> TinyModels:
    """Tiny builds of registered models (see :class:`TinyModels`)."""
    return TinyModels()
