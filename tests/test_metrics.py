"""CMC / mAP / mINP against a plain per-query NumPy loop, a hand-worked case, and the input checks."""

from __future__ import annotations

import re
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

import reid_ms
from reid_ms.errors import InputError
from reid_ms.metrics import evaluate


def _reference(qf, gf, q_pids, g_pids, q_cams, g_cams, metric, max_rank, distances=None):
    """One query at a time, the textbook way (float64, stable sort: ties keep gallery order).

    ``distances[i][j]``: sortable keys in place of the float64 distances (e.g. exact rationals).
    """
    qf, gf = qf.astype(np.float64), gf.astype(np.float64)
    if metric == "cosine":
        qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    max_rank = min(max_rank, len(gf))
    cmcs, aps, inps = [], [], []
    for i in range(len(qf)):
        if distances is not None:
            order = np.array(sorted(range(len(gf)), key=lambda j: distances[i][j]))     # sorted() is stable
        elif metric == "cosine":
            order = np.argsort(1.0 - gf @ qf[i], kind="stable")
        else:
            order = np.argsort(((gf - qf[i]) ** 2).sum(axis=1), kind="stable")
        removed = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
        hits = (g_pids[order] == q_pids[i])[~removed]
        if not hits.any():
            continue
        hit_at = np.flatnonzero(hits)                       # 0-based positions of the correct matches
        cmc = np.zeros(max_rank)
        cmc[hit_at[0]:] = 1.0
        cmcs.append(cmc)
        aps.append(np.mean([(k + 1) / (pos + 1) for k, pos in enumerate(hit_at)]))
        inps.append(len(hit_at) / (hit_at[-1] + 1))
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(cmcs)


def _tied_problem(seed: int, metric: str):
    """Features whose distances are exact in binary floating point, so ties are true ties everywhere.

    cosine: entries +-1 in 16 dimensions times a power of two, so every normalised entry is +-1/4 and
    every dot product a multiple of 1/16. euclidean: small integers. Few distinct values -> many ties.
    """
    rng = np.random.default_rng(seed)
    num_q, num_g = 23, 61
    if metric == "cosine":
        make = lambda n: rng.choice([-1.0, 1.0], size=(n, 16)) * rng.choice([1.0, 2.0, 4.0], size=(n, 1))
    else:
        make = lambda n: rng.integers(-2, 3, size=(n, 6)).astype(np.float64)
    qf, gf = make(num_q), make(num_g)
    g_pids = rng.integers(0, 8, size=num_g)
    g_cams = rng.integers(0, 3, size=num_g)
    q_pids = rng.integers(0, 10, size=num_q)                # ids 8, 9 never appear in the gallery
    q_cams = rng.integers(0, 3, size=num_q)
    # A query whose only gallery match shares its camera: must be skipped.
    g_pids[0], g_cams[0] = 42, 1
    q_pids[0], q_cams[0] = 42, 1
    return qf, gf, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_matches_per_query_loop_with_ties(metric, seed, chunk_size):
    qf, gf, q_pids, g_pids, q_cams, g_cams = _tied_problem(seed, metric)
    ref_cmc, ref_map, ref_minp, ref_valid = _reference(qf, gf, q_pids, g_pids, q_cams, g_cams, metric, 50)
    assert ref_valid < len(qf)                              # invalid queries really are present
    r = evaluate(torch.from_numpy(qf).float(), torch.from_numpy(gf).float(), torch.from_numpy(q_pids),
                 torch.from_numpy(g_pids), torch.from_numpy(q_cams), torch.from_numpy(g_cams),
                 metric=metric, chunk_size=chunk_size)
    assert r.num_valid_queries == ref_valid
    assert r.cmc.shape == (50,)
    np.testing.assert_allclose(r.cmc.numpy(), ref_cmc, atol=1e-6, rtol=0)
    assert r.mAP == pytest.approx(ref_map, abs=1e-6)
    assert r.mINP == pytest.approx(ref_minp, abs=1e-6)


def test_hand_worked_case():
    # 1-D integer features, squared euclidean distance to the query.
    #   gallery  g0   g1   g2   g3   g4   g5
    #   feature   1    2    3    4    5    6
    #   pid       2    1    1    3    1    2
    #   cam       1    0    1    1    2    2
    # Query A (pid 1, cam 0, at 0): distances 1 4 9 16 25 36 -> g0 g1 g2 g3 g4 g5; g1 is pid 1 on cam 0,
    #   removed -> g0 x, g2 hit (pos 2), g3 x, g4 hit (pos 4), g5 x.
    #   first hit 2; AP = (1/2 + 2/4) / 2 = 0.5; INP = 2 hits / last hit at 4 = 0.5.
    # Query B (pid 2, cam 0, at 4): distances 9 4 1 0 1 4 -> g3 g2 g4 g1 g5 g0 (ties 1,1 and 4,4 keep
    #   gallery order). Nothing removed. Hits g5 (pos 5), g0 (pos 6).
    #   first hit 5; AP = (1/5 + 2/6) / 2 = 4/15; INP = 2/6 = 1/3.
    #   (Had g5 been put before g1 in the tie, AP would be (1/4 + 2/6) / 2 = 7/24 instead.)
    # Query C (pid 4): no pid 4 in the gallery -> skipped.
    # Query D (pid 3, cam 1, at 4): the only pid 3 (g3) is on cam 1 -> removed -> skipped.
    # Valid queries: A, B. CMC: first hits {2, 5} -> [0, .5, .5, .5, 1, 1].
    # mAP = (1/2 + 4/15) / 2 = 23/60; mINP = (1/2 + 1/3) / 2 = 5/12.
    gf = [[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]]
    qf = [[0.0], [4.0], [0.0], [4.0]]
    r = evaluate(qf, gf, q_pids=[1, 2, 4, 3], g_pids=[2, 1, 1, 3, 1, 2],
                 q_cams=[0, 0, 0, 1], g_cams=[1, 0, 1, 1, 2, 2], metric="euclidean", chunk_size=3)
    assert r.num_valid_queries == 2
    np.testing.assert_allclose(r.cmc.numpy(), [0, 0.5, 0.5, 0.5, 1, 1], atol=1e-12)
    assert r.mAP == pytest.approx(23 / 60, abs=1e-12)
    assert r.mINP == pytest.approx(5 / 12, abs=1e-12)
    assert r.rank(1) == 0.0 and r.rank(5) == 1.0 and r.rank(10) == 1.0


def test_cosine_equals_euclidean_on_normalised_features():
    g = torch.Generator().manual_seed(0)
    qf, gf = torch.randn(30, 12, generator=g), torch.randn(90, 12, generator=g)
    q_pids, g_pids = torch.randint(0, 6, (30,), generator=g), torch.randint(0, 6, (90,), generator=g)
    q_cams, g_cams = torch.randint(0, 4, (30,), generator=g), torch.randint(0, 4, (90,), generator=g)
    cos = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine")
    euc = evaluate(torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1),
                   q_pids, g_pids, q_cams, g_cams, metric="euclidean")
    torch.testing.assert_close(cos.cmc, euc.cmc)
    assert cos.mAP == pytest.approx(euc.mAP, abs=1e-9)
    assert cos.mINP == pytest.approx(euc.mINP, abs=1e-9)
    # Raw (unnormalised) euclidean ranks differently: the cosine path really normalises.
    raw = evaluate(qf * torch.rand(30, 1, generator=g) * 10, gf, q_pids, g_pids, q_cams, g_cams, metric="euclidean")
    assert raw.mAP != pytest.approx(cos.mAP, abs=1e-9)


def test_perfect_and_numpy_inputs():
    # Every query's own copies (other cameras) are closest: rank-1, mAP and mINP are all exactly 1.
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(4, 8))
    gf = np.repeat(centres, 3, axis=0)
    r = evaluate(centres, gf, np.arange(4), np.repeat(np.arange(4), 3), np.zeros(4, dtype=np.int64),
                 np.tile([1, 2, 3], 4), max_rank=5)
    assert r.num_valid_queries == 4 and r.cmc.shape == (5,)
    np.testing.assert_allclose(r.cmc.numpy(), 1.0)
    assert r.mAP == 1.0 and r.mINP == 1.0


def test_max_rank_capped_at_gallery_size():
    r = evaluate([[1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]], [0], [1, 0], [0], [1, 1], max_rank=50)
    assert r.cmc.tolist() == [0.0, 1.0]
    assert r.mAP == 0.5 and r.mINP == 0.5


def test_exported_from_package():
    assert reid_ms.metrics.evaluate is evaluate


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qf=np.ones((2, 4)), gf=np.ones((3, 5))), "4 wide"),
        (dict(qf=np.ones(4)), "2-D"),
        (dict(qf=np.ones((0, 4)), q_pids=[], q_cams=[]), "empty"),
        (dict(gf=np.ones((0, 4)), g_pids=[], g_cams=[]), "empty"),
        (dict(q_pids=[0, 1, 2]), "q_pids"),
        (dict(g_cams=[0, 1]), "g_cams"),
        (dict(q_pids=[0.5, 1.0]), "integers"),
        (dict(metric="hamming"), "metric"),
        (dict(qf=np.array([[np.nan, 0, 0, 0], [1, 0, 0, 0]])), "NaN"),
        (dict(q_pids=[7, 8]), "none of the 2 queries"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(q_pids="ab"), "q_pids must be one integer per row of qf; got a str"),
        (dict(q_pids=["a", "b"]), "q_pids must be one integer per row of qf; got a list"),
        (dict(g_pids=None), "g_pids must be one integer per row of gf; got a NoneType"),
        (dict(q_cams=[[0], [1, 2]]), "q_cams must be one integer per row of qf; got a list"),
        (dict(q_pids=[2 ** 70, 1]), "q_pids must be one integer per row"),
        (dict(qf=[[1.0, 2.0, 3.0, 4.0], [1.0]]), "qf must be a 2-D array of real features"),
        (dict(qf="features"), "qf must be a 2-D array of real features"),
        (dict(gf=np.ones((3, 4)) * (1 + 1j)), "gf must hold real numbers, got dtype torch.complex128"),
        (dict(qf=np.ones((2, 4), dtype=bool)), "qf must hold real numbers, got dtype torch.bool"),
        (dict(gf=np.array([[np.inf, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])), "infinite"),
        (dict(max_rank=2.5), "max_rank must be an int >= 1, got 2.5"),
        (dict(max_rank="5"), "max_rank must be an int >= 1, got '5'"),
        (dict(max_rank=True), "max_rank must be an int >= 1, got True"),
        (dict(chunk_size=1.5), "chunk_size must be an int >= 1, got 1.5"),
        (dict(metric=None), "metric must be one of"),
        (dict(metric=["cosine"]), "metric must be one of"),
    ],
)
def test_input_errors(kwargs, message):
    args = dict(qf=np.ones((2, 4)), gf=np.ones((3, 4)), q_pids=[0, 1], g_pids=[0, 1, 1],
                q_cams=[0, 0], g_cams=[1, 1, 1])
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # refused outright: no ComplexWarning on the way
        with pytest.raises(InputError, match=re.escape(message)):
            evaluate(**args)


def test_numpy_integers_are_counts():
    r = evaluate(np.ones((2, 4)), np.ones((3, 4)), [0, 1], [0, 1, 1], [0, 0], [1, 1, 1], max_rank=np.int64(2),
                 chunk_size=np.int32(1))
    assert r.cmc.shape == (2,)


def _random_problem(seed: int, num_q: int = 20, num_g: int = 60, dim: int = 8):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(num_q, dim)), rng.normal(size=(num_g, dim)), rng.integers(0, 5, num_q),
            rng.integers(0, 5, num_g), rng.integers(0, 3, num_q), rng.integers(0, 3, num_g))


def _same(a, b) -> None:
    assert a.num_valid_queries == b.num_valid_queries
    assert torch.equal(a.cmc, b.cmc) and a.mAP == b.mAP and a.mINP == b.mINP


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("dtype, scale", [(np.float32, s) for s in (1e19, 1e20, 1e30, 1e-30, 1e-38, 3.0)]
                         + [(np.float64, s) for s in (1e200, 1e-200)])
def test_a_common_scale_changes_nothing(metric, dtype, scale):
    qf, gf, *labels = _random_problem(0)
    qf, gf = qf.astype(dtype), gf.astype(dtype)
    base = evaluate(qf, gf, *labels, metric=metric)
    # features at another magnitude (the products rounded to their dtype, as a model would output them)
    _same(evaluate(qf * dtype(scale), gf * dtype(scale), *labels, metric=metric), base)


def test_cosine_ignores_each_rows_scale():
    qf, gf, *labels = _random_problem(1)
    rng = np.random.default_rng(2)
    base = evaluate(qf, gf, *labels)
    rows = lambda n: 10.0 ** rng.uniform(-35, 35, size=(n, 1))    # noqa: E731
    _same(evaluate((qf * rows(len(qf))).astype(np.float32), (gf * rows(len(gf))).astype(np.float32), *labels),
          evaluate(qf.astype(np.float32), gf.astype(np.float32), *labels))
    assert base.num_valid_queries > 0


def _exact_distances(qf: np.ndarray, gf: np.ndarray, metric: str) -> list[list]:
    """Keys that order the gallery as the exact distances do, in rational arithmetic (no rounding at all)."""
    q = [[Fraction(float(v)) for v in row] for row in qf]
    g = [[Fraction(float(v)) for v in row] for row in gf]
    if metric == "euclidean":
        return [[sum((a - b) ** 2 for a, b in zip(qr, gr)) for gr in g] for qr in q]
    # 1 - cos falls as q.g / |g| rises (|q| is the same for one query); compare its signed square exactly
    keys = []
    for qr in q:
        dots = [sum(a * b for a, b in zip(qr, gr)) for gr in g]
        keys.append([-(d * abs(d)) / sum(b * b for b in gr) for d, gr in zip(dots, g)])
    return keys


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_extreme_finite_features_rank_exactly(metric, seed):
    # float32 features whose entries span 1e-36 .. 1e36 (sums of squares in float32 overflow and underflow)
    rng = np.random.default_rng(seed)
    qf, gf, q_pids, g_pids, q_cams, g_cams = _random_problem(seed, num_q=6, num_g=25, dim=5)
    shift = rng.choice([-28, 28])
    qf, gf = ((x * 10.0 ** (rng.uniform(-8, 8, size=x.shape) + shift)).astype(np.float32) for x in (qf, gf))
    assert np.isfinite(qf).all() and np.isfinite(gf).all()
    ref_cmc, ref_map, ref_minp, ref_valid = _reference(qf, gf, q_pids, g_pids, q_cams, g_cams, metric, 50,
                                                       distances=_exact_distances(qf, gf, metric))
    r = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=metric)
    assert r.num_valid_queries == ref_valid
    np.testing.assert_allclose(r.cmc.numpy(), ref_cmc, atol=1e-12, rtol=0)
    assert r.mAP == pytest.approx(ref_map, abs=1e-12) and r.mINP == pytest.approx(ref_minp, abs=1e-12)


def test_short_repr():
    r = evaluate([[0.0], [4.0]], [[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]], [1, 2], [2, 1, 1, 3, 1, 2], [0, 0],
                 [1, 0, 1, 1, 2, 2], metric="euclidean")
    # the hand-worked case above without its two skipped queries: mAP 23/60, mINP 5/12, first hits at 2 and 5
    assert repr(r) == "EvalResult(mAP=0.3833, mINP=0.4167, rank1=0.0000, rank5=1.0000, num_valid_queries=2)"
    html = r._repr_html_()
    assert html.startswith("<table>") and "<td>mAP</td><td>38.33%</td>" in html and "<td>Rank-5</td><td>100.00%" in html
    assert "tensor" not in repr(r) + html and "Rank-10" not in html
