"""Re-identification retrieval metrics: CMC, mAP and mINP under the Market-1501 protocol.

Every query ranks the whole gallery by distance. Gallery entries showing the query's person under the
query's camera are removed from that ranking (they would be trivial matches); a query left without any
correct match is skipped and not counted. On the remaining ranking:

- CMC at rank ``k``: share of valid queries whose first correct match sits at position ``<= k``.
- AP: mean, over the correct matches, of the precision at each match's position; mAP averages AP.
- INP (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", the AGW paper):
  ``number of correct matches / position of the last (hardest) correct match``; mINP averages INP.

Ties in distance are ordered by gallery index (a stable sort), so results are deterministic and do not
depend on the sorting algorithm. TransReID's and CLIP-ReID's ``eval_func`` use NumPy's default
(unstable) quicksort, so on exactly tied distances their numbers may differ from these; with real-valued
features ties practically never occur.

Distances are computed for a chunk of queries against the whole gallery at a time, so a 20k x 20k
problem never holds more than ``chunk_size x num_gallery`` distances in memory. They are computed in
float64 after scaling the features by a power of two (each row for cosine, one common factor for
Euclidean), which changes no ranking: features of any float32 magnitude, 1e-30 or 1e30, rank as they would
at magnitude 1, where float32 sums of squares would underflow or overflow.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from reid_ms.errors import InputError
from reid_ms.rerank import TRANSREID_RERANK, query_expansion, re_ranking  # noqa: F401  (public here)

__all__ = ["EvalResult", "evaluate", "METRICS", "re_ranking", "query_expansion"]

ArrayLike = Union[torch.Tensor, np.ndarray, list, tuple]

METRICS = ("cosine", "euclidean")


@dataclass(frozen=True)
class EvalResult:
    """Retrieval scores over the valid queries.

    Attributes:
        cmc: ``[max_rank]`` float64 tensor; ``cmc[k - 1]`` is the rank-``k`` accuracy in ``[0, 1]``.
        mAP: mean average precision in ``[0, 1]``.
        mINP: mean inverse negative penalty in ``[0, 1]``.
        num_valid_queries: queries that kept at least one correct match after the same-camera removal.
    """

    cmc: torch.Tensor
    mAP: float
    mINP: float
    num_valid_queries: int

    def __repr__(self) -> str:
        ranks = ", ".join(f"rank{k}={self.rank(k):.4f}" for k in (1, 5, 10) if k <= len(self.cmc))
        return (f"EvalResult(mAP={self.mAP:.4f}, mINP={self.mINP:.4f}, {ranks}, "
                f"num_valid_queries={self.num_valid_queries})")

    def _repr_html_(self) -> str:
        rows = [("mAP", self.mAP), ("mINP", self.mINP), *((f"Rank-{k}", self.rank(k)) for k in (1, 5, 10)
                                                         if k <= len(self.cmc))]
        cells = "".join(f"<tr><td>{name}</td><td>{100 * value:.2f}%</td></tr>" for name, value in rows)
        return f"<table>{cells}<tr><td>valid queries</td><td>{self.num_valid_queries}</td></tr></table>"

    def rank(self, k: int) -> float:
        """Rank-``k`` accuracy (``k`` is 1-based); ranks past ``len(cmc)`` stay at the last value."""
        if k < 1:
            raise InputError(f"rank k is 1-based, got k={k}")
        return float(self.cmc[min(k, len(self.cmc)) - 1])


def _tensor(x: Any, name: str, expected: str) -> torch.Tensor:
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:    # None, strings, ragged lists, ints past 64 bits
        raise InputError(f"{name} must be {expected}; got a {type(x).__name__} that is not ({exc})") from exc


def _features(x: ArrayLike, name: str) -> torch.Tensor:
    t = _tensor(x, name, "a 2-D array of real features [N, D]")
    if t.dim() != 2:
        raise InputError(f"{name} must be a 2-D array of features [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {tuple(t.shape)}); evaluation needs at least one entry")
    if t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.double()
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name} contains NaN or infinite values; check the model output that produced it")
    return t


def _labels(x: ArrayLike, name: str, count: int, count_name: str) -> torch.Tensor:
    t = _tensor(x, name, f"one integer per row of {count_name}")
    if t.dim() != 1 or t.shape[0] != count:
        raise InputError(f"{name} must hold one integer per row of {count_name} ({count}), "
                         f"got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name} must hold integers, got dtype {t.dtype}")
    return t.long()


def _count(x: Any, name: str) -> int:
    try:
        value = operator.index(x)
    except TypeError:
        raise InputError(f"{name} must be an int >= 1, got {x!r}") from None
    if value < 1 or isinstance(x, bool):
        raise InputError(f"{name} must be an int >= 1, got {x!r}")
    return value


def _scaled(x: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """``x`` in float64 divided by the power of two just above ``peak`` (its largest magnitude, or one per row).

    Dividing by a power of two is exact, so no ranking changes; afterwards no entry exceeds 1, and float64
    sums of squares neither overflow nor underflow for features anywhere in float32's range.
    """
    _, exponent = torch.frexp(torch.where(peak > 0, peak, torch.ones_like(peak)))
    return torch.ldexp(x.double(), -exponent.double())


def _distances(q: torch.Tensor, g: torch.Tensor, g_sq: torch.Tensor | None) -> torch.Tensor:
    """``[Cq, G]`` distances: cosine without ``g_sq`` (the gallery's squared norms), else the squared
    euclidean distance (same ranking, no square root)."""
    if g_sq is None:
        return 1.0 - q @ g.T
    q_sq = (q * q).sum(dim=1, keepdim=True)
    # |q - g|^2 expanded; rounding can push a true zero slightly below it.
    return (q_sq + g_sq[None, :] - 2.0 * (q @ g.T)).clamp_min_(0.0)


def evaluate(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_cams: ArrayLike,
    g_cams: ArrayLike,
    metric: str = "cosine",
    max_rank: int = 50,
    chunk_size: int = 128,
    rerank: bool | dict = False,
) -> EvalResult:
    """Rank the gallery for every query and score the rankings (Market-1501 protocol).

    Args:
        qf: query features ``[Q, D]`` (tensor, array or nested list).
        gf: gallery features ``[G, D]``.
        q_pids, g_pids: person ids ``[Q]`` / ``[G]`` (any integers; junk filtering is the caller's).
        q_cams, g_cams: camera ids ``[Q]`` / ``[G]``.
        metric: ``"cosine"`` (features L2-normalised, distance ``1 - cos``) or ``"euclidean"`` (squared
            distance on the raw features; the ranking equals the plain distance's).
        max_rank: length of the returned CMC curve, capped at ``G``.
        chunk_size: queries ranked at once; peak memory is a few ``chunk_size x G`` tensors.
        rerank: rank by k-reciprocal re-ranked distances (:func:`re_ranking` on the features as
            ``metric`` prepares them, L2-normalised for ``cosine``): ``True`` for TransReID's evaluation
            setting (k1=50, k2=15, lambda_value=0.3), or a dict of other values. It holds a ``[Q, G]`` matrix.

    Returns:
        :class:`EvalResult` with ``cmc [min(max_rank, G)]``, ``mAP``, ``mINP``, ``num_valid_queries``.

    Raises:
        InputError: mismatched lengths or feature widths, empty sets, non-finite features, an unknown
            metric, or no query with a correct match in the gallery.
    """
    if not isinstance(metric, str) or metric not in METRICS:
        raise InputError(f"metric must be one of {METRICS}, got {metric!r}")
    max_rank, chunk_size = _count(max_rank, "max_rank"), _count(chunk_size, "chunk_size")
    q, g = _features(qf, "qf"), _features(gf, "gf")
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query features are {q.shape[1]} wide but gallery features {g.shape[1]}; "
                         f"extract both with the same model")
    g = g.to(q.device)
    num_q, num_g = q.shape[0], g.shape[0]
    q_pids_t = _labels(q_pids, "q_pids", num_q, "qf").to(q.device)
    q_cams_t = _labels(q_cams, "q_cams", num_q, "qf").to(q.device)
    g_pids_t = _labels(g_pids, "g_pids", num_g, "gf").to(q.device)
    g_cams_t = _labels(g_cams, "g_cams", num_g, "gf").to(q.device)

    g_sq = None
    if metric == "cosine":
        q, g = (F.normalize(_scaled(x, x.abs().amax(dim=1, keepdim=True)), dim=1) for x in (q, g))
    else:
        peak = torch.maximum(q.abs().amax(), g.abs().amax())         # one factor for both: distances keep order
        q, g = _scaled(q, peak), _scaled(g, peak)
        g_sq = (g * g).sum(dim=1)
    max_rank = min(max_rank, num_g)
    reranked = None
    if rerank is not False:
        unknown = set(rerank) - set(TRANSREID_RERANK) if isinstance(rerank, dict) else set()
        if unknown or not isinstance(rerank, (bool, dict)):
            raise InputError(f"rerank is True, False or a dict of {sorted(TRANSREID_RERANK)}, got {rerank!r}")
        reranked = re_ranking(q, g, **{**TRANSREID_RERANK, **(rerank if isinstance(rerank, dict) else {})})

    first_hits: list[torch.Tensor] = []
    ap_sum = inp_sum = 0.0
    positions = torch.arange(1, num_g + 1, device=q.device, dtype=torch.float64)
    for start in range(0, num_q, chunk_size):
        stop = min(start + chunk_size, num_q)
        dist = _distances(q[start:stop], g, g_sq) if reranked is None else reranked[start:stop].to(q.device)
        order = torch.sort(dist, dim=1, stable=True).indices                      # [C, G]
        ranked_pids, ranked_cams = g_pids_t[order], g_cams_t[order]
        same_pid = ranked_pids == q_pids_t[start:stop, None]
        keep = ~(same_pid & (ranked_cams == q_cams_t[start:stop, None]))
        match = same_pid & keep
        # Position of each kept entry in the ranking with the removed entries taken out (1-based).
        kept_pos = keep.cumsum(dim=1, dtype=torch.float64)
        hits_so_far = match.cumsum(dim=1, dtype=torch.float64)
        num_match = hits_so_far[:, -1]
        valid = num_match > 0
        if not bool(valid.any()):
            continue
        kept_pos, match, hits_so_far, num_match = kept_pos[valid], match[valid], hits_so_far[valid], num_match[valid]
        # Where there is no match the position is pushed past the end, so min/max pick matches only.
        match_pos = torch.where(match, kept_pos, positions.new_tensor(float(num_g + 1)))
        first_hits.append(match_pos.min(dim=1).values)
        last_pos = torch.where(match, kept_pos, positions.new_zeros(())).max(dim=1).values
        precision = torch.where(match, hits_so_far / kept_pos, positions.new_zeros(()))
        ap_sum += float((precision.sum(dim=1) / num_match).sum())
        inp_sum += float((num_match / last_pos).sum())

    if not first_hits:
        raise InputError(f"none of the {num_q} queries has a correct match in the gallery outside its own "
                         f"camera; check that query and gallery ids come from the same dataset")
    first = torch.cat(first_hits)
    num_valid = int(first.shape[0])
    cmc = (first[:, None] <= positions[None, :max_rank]).double().mean(dim=0).cpu()
    return EvalResult(cmc=cmc, mAP=ap_sum / num_valid, mINP=inp_sum / num_valid, num_valid_queries=num_valid)
