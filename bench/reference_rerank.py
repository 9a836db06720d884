"""TransReID's k-reciprocal re-ranking (``utils/reranking.py``) as a plain NumPy loop, for tests and benches.

Written from the published algorithm, step for step as that code runs it: dense ``N x N`` float32
distances normalised by each column's maximum and transposed, a full ``argsort`` of every row, ``V``
and the query-expanded ``V`` stored in ``storage`` (float16 in TransReID), an inverted index of ``V``'s
columns, and the Jaccard sums accumulated per query in ``storage``. ``storage=np.float64`` gives the
algorithm without TransReID's half-precision rounding.
"""

from __future__ import annotations

import numpy as np
import torch


def reference_re_ranking(qf: torch.Tensor, gf: torch.Tensor, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                         storage: type = np.float16) -> np.ndarray:
    """``[Q, G]`` re-ranked distances, computed as TransReID computes them."""
    num_q = qf.shape[0]
    feat = torch.cat([qf, gf]).float()
    n = feat.shape[0]
    sq = feat.pow(2).sum(dim=1, keepdim=True).expand(n, n)
    dist = (sq + sq.t()).addmm_(feat, feat.t(), beta=1, alpha=-2)
    original = dist.numpy()
    del dist, sq
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original).astype(storage)
    initial_rank = np.argsort(original).astype(np.int32)
    half = int(np.around(k1 / 2))

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(n):
        k_recip = reciprocal(i, k1)
        expansion = k_recip
        for candidate in k_recip:
            cand_recip = reciprocal(candidate, half)
            if len(np.intersect1d(cand_recip, k_recip)) > 2 / 3 * len(cand_recip):
                expansion = np.append(expansion, cand_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    original = original[:num_q]
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=storage)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
        del v_qe
    del initial_rank
    inv_index = [np.where(v[:, i] != 0)[0] for i in range(n)]
    jaccard = np.zeros_like(original, dtype=storage)
    for i in range(num_q):
        temp_min = np.zeros((1, n), dtype=storage)
        nonzero = np.where(v[i] != 0)[0]
        for k in nonzero:
            rows = inv_index[k]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(v[i, k], v[rows, k])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:num_q, num_q:]
