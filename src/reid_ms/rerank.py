"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) as TransReID computes it, without its N x N matrices.

The algorithm, on the ``N = Q + G`` query and gallery features together:

1. ``d(i, j)``: squared Euclidean distance, divided by the largest distance of row ``i``.
2. ``R(i)``: the ``k1 + 1`` nearest neighbours of ``i`` (itself included); the k-reciprocal set ``K(i)`` keeps
   those ``j`` with ``i`` in ``R(j)`` too. For every ``c`` in ``K(i)``, its own reciprocal set at
   ``round(k1 / 2)`` is added when more than two thirds of it lie in ``K(i)``.
3. ``V[i, j] = exp(-d(i, j))`` over that expanded set, normalised to sum 1; with ``k2 > 1``, ``V[i]`` is
   replaced by the mean of ``V`` over the ``k2`` nearest neighbours of ``i`` (local query expansion).
4. Jaccard distance ``1 - m / (2 - m)`` with ``m = sum_k min(V[q, k], V[g, k])``; the result is
   ``(1 - lambda) * jaccard + lambda * d(q, g)``.

TransReID's code (``utils/reranking.py``) builds every step as a dense ``N x N`` array (distances, a full
argsort, ``V`` in float16) and loops in Python over the rows. Here only the ``k1 + 1`` nearest neighbours
are kept (distances are computed a block of rows at a time), ``V`` is sparse (a few hundred entries per
row), and the Jaccard sums run over the pairs that share a non-zero column, in bounded chunks; the
result is the same up to TransReID's float16 rounding of ``V`` and the Jaccard sums (this code keeps
float32). Peak memory is the ``[Q, G]`` result plus a few bounded buffers.
"""

from __future__ import annotations

import warnings
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from reid_ms.errors import InputError

__all__ = ["re_ranking", "query_expansion", "TRANSREID_RERANK"]

ArrayLike = Union[torch.Tensor, np.ndarray]

# TransReID's evaluation setting (TEST.RE_RANKING: k1=50, k2=15, lambda=0.3)
TRANSREID_RERANK: dict[str, Any] = {"k1": 50, "k2": 15, "lambda_value": 0.3}

# rows of the [rows, N] distance block computed at once
_ROW_BLOCK = 512
# (query, gallery, shared column) triples summed at once in the Jaccard step
_PAIR_BLOCK = 1 << 22


def _as_features(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 2 or t.shape[0] == 0:
        raise InputError(f"{name} must be a non-empty 2-D array of features [N, D], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InputError(f"{name} must hold floating-point features, got dtype {t.dtype}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    return t


def _neighbours(feats: torch.Tensor, k: int, num_q: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rank [N, k], row_max [N], d_qg [Q, G])``: nearest neighbours, largest distances, normalised d(q, g)."""
    n = feats.shape[0]
    sq = (feats * feats).sum(dim=1)
    rank = torch.empty(n, k, dtype=torch.long)
    row_max = torch.empty(n)
    d_qg = torch.empty(num_q, n - num_q)
    for start in range(0, n, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, n)
        # TransReID's |a|^2 + |b|^2 - 2 a.b, in float32, not clamped
        d = torch.addmm(sq[start:stop, None] + sq[None, :], feats[start:stop], feats.T, alpha=-2.0)
        row_max[start:stop] = d.max(dim=1).values
        rank[start:stop] = d.topk(k, dim=1, largest=False, sorted=True).indices
        if start < num_q:
            q_stop = min(stop, num_q)
            d_qg[start:q_stop] = d[: q_stop - start, num_q:] / row_max[start:q_stop, None]
    return rank, row_max, d_qg


def _reciprocal(rank: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` bool: ``rank[i, a]`` has ``i`` among its own first ``k`` neighbours."""
    n = rank.shape[0]
    k = min(k, rank.shape[1])
    out = torch.empty(n, k, dtype=torch.bool)
    head = rank[:, :k]
    for start in range(0, n, 4096):
        stop = min(start + 4096, n)
        ids = torch.arange(start, stop)[:, None, None]
        out[start:stop] = (head[head[start:stop]] == ids).any(dim=2)
    return out


def _sparse_v(feats: torch.Tensor, rank: torch.Tensor, row_max: torch.Tensor, k1: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V`` as COO triplets ``(rows, cols, values)`` sorted by row then column (steps 2 and 3)."""
    n = feats.shape[0]
    half = int(np.around(k1 / 2))                      # NumPy's rounding (half to even), as TransReID
    recip = _reciprocal(rank, k1 + 1)                  # [N, k1 + 1]
    recip_half = _reciprocal(rank, half + 1)           # [N, half + 1]
    head_half = rank[:, : half + 1]
    size_half = recip_half.sum(dim=1).double()
    sq = (feats * feats).sum(dim=1)
    rows_out, cols_out, vals_out = [], [], []
    block = 1024
    # one row of set membership per row of the block; column n collects the masked-out entries
    member = torch.zeros(block, n + 1, dtype=torch.bool)
    for start in range(0, n, block):
        stop = min(start + block, n)
        c = stop - start
        fwd = rank[start:stop, : k1 + 1]                              # [C, A]
        keep = recip[start:stop]                                      # K(i) as a mask over fwd
        cand = head_half[fwd]                                         # [C, A, B]: R_half of each candidate
        cand_keep = recip_half[fwd]                                   # its reciprocal mask
        in_k = member[:c].zero_().scatter_(1, torch.where(keep, fwd, n), True)
        inside = in_k.gather(1, cand.flatten(1)).view_as(cand)       # candidate's neighbours in K(i)
        inter = (inside & cand_keep).sum(dim=2).double()              # |K_half(c) & K(i)|
        take = keep & (inter > 2.0 / 3.0 * size_half[fwd])           # [C, A]
        in_k.scatter_(1, torch.where(cand_keep & take[..., None], cand, n).flatten(1), True)
        in_k[:, n] = False
        local, cols = in_k.nonzero(as_tuple=True)                     # sorted and unique
        rows = local + start
        dots = torch.empty(len(rows))
        for p in range(0, len(rows), 8192):                           # [pairs, D] gathers stay small
            sl = slice(p, p + 8192)
            dots[sl] = (feats.index_select(0, rows[sl]) * feats.index_select(0, cols[sl])).sum(dim=1)
        dist = (sq[rows] + sq[cols] - 2.0 * dots) / row_max[rows]
        weight = torch.exp(-dist)
        total = torch.zeros(c).index_add_(0, local, weight)
        rows_out.append(rows)
        cols_out.append(cols)
        vals_out.append(weight / total[local])
    return torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out)


def _query_expand_v(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, rank: torch.Tensor, k2: int,
                    n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``V_qe[i] = mean(V[rank[i, :k2]])`` as COO triplets grouped by row: one sparse product ``A @ V``."""
    k2 = min(k2, n)
    crow = torch.zeros(n + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        v = torch.sparse_csr_tensor(crow, cols, vals, (n, n), check_invariants=False)
        averaging = torch.sparse_csr_tensor(torch.arange(0, n * k2 + 1, k2),
                                            rank[:, :k2].sort(dim=1).values.flatten(),
                                            torch.full((n * k2,), 1.0 / k2), (n, n), check_invariants=False)
        v_qe = torch.sparse.mm(averaging, v)
    counts = v_qe.crow_indices().diff()
    return torch.arange(n).repeat_interleave(counts), v_qe.col_indices(), v_qe.values()


def _jaccard_into(out: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, num_q: int,
                  n: int, lambda_value: float) -> None:
    """``out [Q, G]`` (holding ``d(q, g)``) becomes ``(1 - lambda) * jaccard + lambda * d``, in place.

    Every query entry ``(q, k)`` meets the gallery entries of column ``k``. The gallery entries are laid out
    per column in padded tables, one per power-of-two column length (at most twice the entries), so a
    query entry reads its partners as one contiguous row; the minima are summed per ``(q, g)`` into a block
    of queries small enough to stay in cache.
    """
    num_g = n - num_q
    q_end = int(torch.searchsorted(rows, torch.tensor(num_q)))       # rows are grouped in order: queries first
    q_rows, q_cols, q_vals = rows[:q_end], cols[:q_end], vals[:q_end]
    g_rows, g_cols, g_vals = rows[q_end:] - num_q, cols[q_end:], vals[q_end:]
    order = torch.argsort(g_cols, stable=True)                         # gallery entries by column
    g_rows, g_vals = g_rows[order], g_vals[order]
    degree = torch.bincount(g_cols, minlength=n)
    col_ptr = degree.cumsum(0) - degree
    width = torch.where(degree > 0, 2 ** torch.ceil(torch.log2(degree.clamp_min(1).double())).long(), 0)
    # per width: the padded [columns, width] tables of gallery rows (padding points at a spare column G)
    # and values (padding 0), and each column's slot in them
    slot = torch.full((n,), -1, dtype=torch.long)
    tables = {}
    for w in torch.unique(width[width > 0]).tolist():
        members = torch.nonzero(width == w).squeeze(1)
        slot[members] = torch.arange(len(members))
        pos = col_ptr[members, None] + torch.arange(w)
        valid = torch.arange(w) < degree[members, None]
        pos = torch.where(valid, pos, 0)
        tables[w] = (torch.where(valid, g_rows[pos], num_g), torch.where(valid, g_vals[pos], 0.0))
    cost = width[q_cols]                                               # padded partners of each query entry
    entry_ptr = torch.zeros(num_q + 1, dtype=torch.long)
    entry_ptr[1:] = torch.bincount(q_rows, minlength=num_q).cumsum(0)
    cum = torch.zeros(num_q, dtype=torch.long).index_add_(0, q_rows, cost).cumsum(0)
    stride = num_g + 1
    rows_cap = max(1, (1 << 21) // stride)
    start = 0
    while start < num_q:
        base = int(cum[start - 1]) if start else 0
        stop = int(torch.searchsorted(cum, torch.tensor(base + _PAIR_BLOCK), right=True))
        stop = min(max(stop, start + 1), start + rows_cap, num_q)
        e0, e1 = int(entry_ptr[start]), int(entry_ptr[stop])
        shared = torch.zeros((stop - start) * stride)
        e_cols, e_width = q_cols[e0:e1], cost[e0:e1]
        for w, (t_rows, t_vals) in tables.items():
            sel = torch.nonzero(e_width == w).squeeze(1)
            if len(sel) == 0:
                continue
            at = slot[e_cols[sel]]
            target = t_rows.index_select(0, at).add_(((q_rows[e0:e1][sel] - start) * stride)[:, None])
            partner = t_vals.index_select(0, at)
            shared.index_add_(0, target.flatten(), torch.minimum(partner, q_vals[e0:e1][sel, None]).flatten())
        shared = shared.view(stop - start, stride)[:, :num_g]
        jaccard = 1.0 - shared / (2.0 - shared)
        out[start:stop].mul_(lambda_value).add_(jaccard, alpha=1.0 - lambda_value)
        start = stop


def re_ranking(qf: ArrayLike, gf: ArrayLike, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> torch.Tensor:
    """k-reciprocal re-ranked distances ``[Q, G]`` float32 between queries ``qf [Q, D]`` and gallery ``gf [G, D]``.

    Equal to TransReID's ``re_ranking(qf, gf, k1, k2, lambda_value)`` within its float16 rounding. The
    original distance is the squared Euclidean distance of the features as given (L2-normalise them first
    for a cosine model, as TransReID's evaluator does). Smaller is closer.

    Args:
        k1: neighbourhood of the k-reciprocal sets (TransReID evaluates with 50, the paper uses 20).
        k2: neighbours averaged in the local query expansion of the encodings (1: none).
        lambda_value: weight of the original distance against the Jaccard distance.
    """
    q = _as_features(qf, "qf")
    g = _as_features(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query features are {q.shape[1]} wide but gallery features {g.shape[1]}")
    if k1 < 1 or k2 < 1 or not 0.0 <= lambda_value <= 1.0:
        raise InputError(f"re-ranking needs k1 >= 1, k2 >= 1 and lambda_value in [0, 1], got {k1}, {k2}, {lambda_value}")
    feats = torch.cat([q, g]).cpu()
    n, num_q = feats.shape[0], q.shape[0]
    # neighbour lists longer than the set are cut at its size, as NumPy's slicing does in TransReID's code
    rank, row_max, out = _neighbours(feats, min(max(k1 + 1, k2), n), num_q)
    threads = torch.get_num_threads()
    # The sparse steps are many small, memory-bound operations: on one thread they ran 1.3-2.5x faster than on
    # two here (bench/bench_rerank.py), where waiting for a second thread costs more than it brings.
    torch.set_num_threads(1)
    try:
        rows, cols, vals = _sparse_v(feats, rank, row_max, k1)
        if k2 != 1:
            rows, cols, vals = _query_expand_v(rows, cols, vals, rank, k2, n)
        _jaccard_into(out, rows, cols, vals, num_q, n, lambda_value)
    finally:
        torch.set_num_threads(threads)
    return out


def query_expansion(qf: ArrayLike, gf: ArrayLike, k: int = 5) -> torch.Tensor:
    """Average query expansion: each L2-normalised query averaged with its ``k`` nearest gallery features.

    Returns the expanded queries ``[Q, D]``, L2-normalised (Chum et al., ICCV 2007; nearest by cosine).
    Evaluate them against the normalised gallery as usual.
    """
    q = F.normalize(_as_features(qf, "qf"), dim=1)
    g = F.normalize(_as_features(gf, "gf"), dim=1).to(q.device)
    if not 1 <= k <= g.shape[0]:
        raise InputError(f"query expansion needs 1 <= k <= {g.shape[0]} (the gallery size), got k={k}")
    out = torch.empty_like(q)
    for start in range(0, q.shape[0], 1024):
        block = q[start:start + 1024]
        top = (block @ g.T).topk(k, dim=1).indices                    # [C, k]
        out[start:start + 1024] = F.normalize(block + g[top].sum(dim=1), dim=1)
    return out
