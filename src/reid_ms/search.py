"""Top-k retrieval in large galleries: an exact, chunked search and an optional FAISS index.

    dist, idx = reid_ms.search.topk(qf, gf, k=10)            # [Q, k] each, nearest first
    index = reid_ms.search.FaissIndex(gf)                     # needs faiss-cpu (pip install 'reid-ms[faiss]')
    dist, idx = index.search(qf, k=10)                        # the same top-k

:func:`topk` computes distances for a block of queries against a block of gallery features at a time and
keeps a running top-k, so memory stays at a few ``query_chunk x gallery_chunk`` blocks plus the features:
it never holds the ``Q x G`` matrix. Distances are ``1 - cos`` (``"cosine"``, features L2-normalised) or the
squared Euclidean distance (``"euclidean"``), as in :func:`reid_ms.metrics.evaluate`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from reid_ms.errors import ConfigError, InputError
from reid_ms.rerank import ArrayLike, _as_features

__all__ = ["topk", "FaissIndex", "SEARCH_METRICS"]

SEARCH_METRICS = ("cosine", "euclidean")


def _prepare(x: ArrayLike, name: str, metric: str, normalise: bool = True) -> torch.Tensor:
    if metric not in SEARCH_METRICS:
        raise InputError(f"metric must be one of {SEARCH_METRICS}, got {metric!r}")
    t = _as_features(x, name)
    return F.normalize(t, dim=1) if metric == "cosine" and normalise else t


def _check_k(k: int, num_g: int) -> None:
    if not 1 <= k <= num_g:
        raise InputError(f"k must be in [1, {num_g}] (the gallery size), got {k}")


def topk(qf: ArrayLike, gf: ArrayLike, k: int = 10, metric: str = "cosine", query_chunk: int = 1024,
         gallery_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest gallery entries of every query, exactly, in bounded memory.

    Args:
        qf: queries ``[Q, D]``. gf: gallery ``[G, D]``.
        k: neighbours per query.
        metric: ``"cosine"`` (distance ``1 - cos``) or ``"euclidean"`` (squared distance).
        query_chunk, gallery_chunk: block sizes; peak extra memory is about
            ``query_chunk * (gallery_chunk + 2 k) * 12`` bytes.

    Returns:
        ``(distances [Q, k] float32, indices [Q, k] int64)``, nearest first.
    """
    q = _prepare(qf, "qf", metric)
    # the gallery is normalised a block at a time: no second gallery-sized copy
    g = _prepare(gf, "gf", metric, normalise=False).to(q.device)
    _check_k(k, g.shape[0])
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query features are {q.shape[1]} wide but gallery features {g.shape[1]}")
    if query_chunk < 1 or gallery_chunk < 1:
        raise InputError(f"query_chunk and gallery_chunk must be >= 1, got {query_chunk}, {gallery_chunk}")
    num_q, num_g = q.shape[0], g.shape[0]
    g_sq = (g * g).sum(dim=1) if metric == "euclidean" else None
    g_inv = 1.0 / g.norm(dim=1).clamp_min(1e-12) if metric == "cosine" else None
    out_d = torch.empty(num_q, k)
    out_i = torch.empty(num_q, k, dtype=torch.long)
    for qs in range(0, num_q, query_chunk):
        block = q[qs:qs + query_chunk]
        q_sq = (block * block).sum(dim=1, keepdim=True)
        # the k best so far, merged with each gallery block's k best
        best_d, best_i = block.new_empty(len(block), 0), torch.empty(len(block), 0, dtype=torch.long, device=q.device)
        for gs in range(0, num_g, gallery_chunk):
            part = g[gs:gs + gallery_chunk]
            if g_inv is not None:
                part = part * g_inv[gs:gs + gallery_chunk, None]
            if g_sq is None:
                d = torch.addmm(torch.ones(()), block, part.T, beta=1.0, alpha=-1.0)       # 1 - cos
            else:
                d = torch.addmm(q_sq + g_sq[None, gs:gs + gallery_chunk], block, part.T, alpha=-2.0).clamp_min_(0.0)
            d, i = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=False)
            d, i = torch.cat([best_d, d], dim=1), torch.cat([best_i, i + gs], dim=1)
            best_d, pick = d.topk(min(k, d.shape[1]), dim=1, largest=False, sorted=False)
            best_i = i.gather(1, pick)
        # nearest first; equal distances by gallery index, as a stable sort of the full row would give
        order = torch.argsort(best_i, dim=1)
        best_d, best_i = best_d.gather(1, order), best_i.gather(1, order)
        order = torch.argsort(best_d, dim=1, stable=True)
        out_d[qs:qs + query_chunk] = best_d.gather(1, order).cpu()
        out_i[qs:qs + query_chunk] = best_i.gather(1, order).cpu()
    return out_d, out_i


class FaissIndex:
    """An exact FAISS index (``IndexFlatIP`` for cosine, ``IndexFlatL2`` for euclidean) over a gallery.

    Needs the optional package ``faiss-cpu`` (``pip install 'reid-ms[faiss]'``). :meth:`search` returns
    what :func:`topk` returns, in the same distances (``1 - cos`` or the squared Euclidean distance).

    Args:
        gf: gallery features ``[G, D]``.
        metric: ``"cosine"`` or ``"euclidean"``.
    """

    def __init__(self, gf: ArrayLike, metric: str = "cosine") -> None:
        try:
            import faiss
        except ImportError as exc:
            raise ConfigError(f"FaissIndex needs the package faiss-cpu ({exc}); pip install 'reid-ms[faiss]', or use "
                              f"reid_ms.search.topk (exact, no extra package)") from exc
        g = _prepare(gf, "gf", metric).cpu().contiguous().numpy()
        self.metric = metric
        self.dim = g.shape[1]
        self.index = faiss.IndexFlatIP(self.dim) if metric == "cosine" else faiss.IndexFlatL2(self.dim)
        self.index.add(g)

    @property
    def size(self) -> int:
        """Gallery entries in the index."""
        return int(self.index.ntotal)

    def search(self, qf: ArrayLike, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """``(distances [Q, k] float32, indices [Q, k] int64)`` of the ``k`` nearest gallery entries, nearest first."""
        _check_k(k, self.size)
        q = _prepare(qf, "qf", self.metric).cpu().contiguous().numpy()
        if q.shape[1] != self.dim:
            raise InputError(f"query features are {q.shape[1]} wide but the index holds {self.dim}-wide features")
        scores, idx = self.index.search(q, k)
        dist = 1.0 - scores if self.metric == "cosine" else scores
        return torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32)), torch.from_numpy(idx.astype(np.int64))
