"""CMC / mAP / mINP against a plain per-query NumPy loop, a hand-worked case, and the input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reid_ms
from reid_ms.errors import InputError
from reid_ms.metrics import evaluate


def _reference(qf, gf, q_pids, g_pids, q_cams, g_cams, metric, max_rank):
    """One query at a time, the textbook way (float64, stable sort: ties keep gallery order)."""
    qf, gf = qf.astype(np.float64), gf.astype(np.float64)
    if metric == "cosine":
        qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        gf = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    max_rank = min(max_rank, len(gf))
    cmcs, aps, inps = [], [], []
    for i in range(len(qf)):
        if metric == "cosine":
            dist = 1.0 - gf @ qf[i]
        else:
            dist = ((gf - qf[i]) ** 2).sum(axis=1)
        order = np.argsort(dist, kind="stable")
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
    ],
)
def test_input_errors(kwargs, message):
    args = dict(qf=np.ones((2, 4)), gf=np.ones((3, 4)), q_pids=[0, 1], g_pids=[0, 1, 1],
                q_cams=[0, 0], g_cams=[1, 1, 1])
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        evaluate(**args)
