"""Ranked-list pictures: each query next to its top-k gallery crops, green for a right match, red for a wrong one.

    img = reid_ms.visualize.show_ranks(dist, query_paths, gallery_paths, q_pids, g_pids, q_cams, g_cams, k=5)
    img.save("ranks.png")

Drawn with PIL only. Gallery entries with the query's person and camera are left out, as the Market-1501
protocol leaves them out of the ranking (:func:`reid_ms.metrics.evaluate`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from reid_ms.errors import InputError

__all__ = ["show_ranks"]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[int]]

GREEN = (40, 170, 60)
RED = (215, 40, 40)
QUERY_FRAME = (60, 60, 60)
BORDER = 4
GAP = 12


def _crop(path: str | os.PathLike, size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    """The image at ``path`` resized to ``size`` (height, width) inside a ``BORDER``-pixel frame of ``colour``."""
    h, w = size
    try:
        with Image.open(path) as img:
            inner = img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read image {str(path)!r}: {exc}") from exc
    framed = Image.new("RGB", (w + 2 * BORDER, h + 2 * BORDER), colour)
    framed.paste(inner, (BORDER, BORDER))
    return framed


def show_ranks(
    dist: ArrayLike,
    query_paths: Sequence[str | os.PathLike],
    gallery_paths: Sequence[str | os.PathLike],
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_cams: Optional[ArrayLike] = None,
    g_cams: Optional[ArrayLike] = None,
    k: int = 5,
    num_queries: Optional[int] = 8,
    cell: tuple[int, int] = (128, 64),
    out: str | os.PathLike | None = None,
) -> Image.Image:
    """One row per query: the query crop, then its ``k`` nearest gallery crops framed green (same person) or red.

    Args:
        dist: distances ``[Q, G]``, smaller is closer (cosine distance, re-ranked distance, ...).
        query_paths, gallery_paths: the image files of the ``Q`` queries and ``G`` gallery entries.
        q_pids, g_pids: person ids ``[Q]`` / ``[G]``.
        q_cams, g_cams: cameras; when given, gallery entries with the query's person and camera are skipped.
        k: gallery crops per row.
        num_queries: rows drawn (the first queries); ``None`` for all.
        cell: ``(height, width)`` of each crop.
        out: save the picture there too (the format from the suffix, e.g. ``.png``).

    Returns:
        The picture as a PIL image.
    """
    d = torch.as_tensor(dist).double()
    if d.dim() != 2 or d.shape != (len(query_paths), len(gallery_paths)):
        raise InputError(f"dist must be [Q, G] = [{len(query_paths)}, {len(gallery_paths)}] (one row per query path, "
                         f"one column per gallery path), got shape {tuple(d.shape)}")
    q_p, g_p = torch.as_tensor(q_pids).long(), torch.as_tensor(g_pids).long()
    if q_p.shape != (d.shape[0],) or g_p.shape != (d.shape[1],):
        raise InputError(f"q_pids and g_pids must hold one id per query ({d.shape[0]}) and gallery entry "
                         f"({d.shape[1]}), got {tuple(q_p.shape)} and {tuple(g_p.shape)}")
    if (q_cams is None) != (g_cams is None):
        raise InputError("give both q_cams and g_cams, or neither")
    q_c = None if q_cams is None else torch.as_tensor(q_cams).long()
    g_c = None if g_cams is None else torch.as_tensor(g_cams).long()
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    rows = d.shape[0] if num_queries is None else min(num_queries, d.shape[0])
    h, w = cell
    tile_w, tile_h = w + 2 * BORDER, h + 2 * BORDER
    label_h = 14
    canvas = Image.new("RGB", (tile_w * (k + 1) + GAP, (tile_h + label_h) * rows), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        order = torch.argsort(d[r], stable=True)
        if q_c is not None and g_c is not None:
            junk = (g_p[order] == q_p[r]) & (g_c[order] == q_c[r])
            order = order[~junk]
        y = r * (tile_h + label_h)
        canvas.paste(_crop(query_paths[r], cell, QUERY_FRAME), (0, y))
        draw.text((2, y + tile_h), f"query {int(q_p[r])}", fill=(0, 0, 0))
        for rank, j in enumerate(order[:k].tolist()):
            x = tile_w + GAP + rank * tile_w
            right = bool(g_p[j] == q_p[r])
            canvas.paste(_crop(gallery_paths[j], cell, GREEN if right else RED), (x, y))
            draw.text((x + 2, y + tile_h), f"{rank + 1}: {int(g_p[j])}", fill=(0, 0, 0))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out)
    return canvas
