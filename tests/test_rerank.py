"""k-reciprocal re-ranking against TransReID's algorithm run as a NumPy loop (bench/reference_rerank.py),
evaluate(rerank=...), and average query expansion."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_ms import InputError, rerank
from reid_ms.metrics import evaluate, query_expansion, re_ranking

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from reference_rerank import reference_re_ranking  # noqa: E402


def _clustered(num_q: int, num_g: int, dim: int = 16, ids: int = 12, seed: int = 0):
    """Features around identity centres (so neighbourhoods and reciprocity are not trivial), with their ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(ids, dim, generator=g)
    pids = torch.randint(0, ids, (num_q + num_g,), generator=g)
    x = centres[pids] + 0.6 * torch.randn(num_q + num_g, dim, generator=g)
    return x[:num_q], x[num_q:], pids[:num_q], pids[num_q:]


@pytest.mark.parametrize("num_q,num_g,k1,k2,lam", [(15, 60, 20, 6, 0.3), (12, 50, 5, 1, 0.5), (10, 70, 9, 3, 0.0),
                                                   (20, 40, 50, 15, 0.3), (3, 10, 20, 12, 0.3), (6, 20, 5, 9, 0.3)])
def test_equals_the_reference_algorithm(num_q, num_g, k1, k2, lam):
    qf, gf, _, _ = _clustered(num_q, num_g, seed=num_q + k1)
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam)
    assert ours.shape == (num_q, num_g) and ours.dtype == torch.float32
    exact = reference_re_ranking(qf, gf, k1, k2, lam, storage=np.float64)
    np.testing.assert_allclose(ours.numpy(), exact, rtol=0, atol=2e-6)
    # TransReID's own float16 storage: the same within its rounding
    half = reference_re_ranking(qf, gf, k1, k2, lam).astype(np.float32)
    np.testing.assert_allclose(ours.numpy(), half, rtol=0, atol=1e-2)
    assert np.abs(ours.numpy() - half).mean() < 1e-3


def test_blocks_do_not_change_the_result(monkeypatch):
    qf, gf, _, _ = _clustered(30, 90, seed=5)
    whole = re_ranking(qf, gf, k1=10, k2=4)
    monkeypatch.setattr(rerank, "_ROW_BLOCK", 7)
    monkeypatch.setattr(rerank, "_PAIR_BLOCK", 3000)
    torch.testing.assert_close(re_ranking(qf, gf, k1=10, k2=4), whole, rtol=0, atol=1e-6)


def _map_from_distances(dist, q_pids, g_pids, q_cams, g_cams) -> float:
    """mAP of a distance matrix under the Market-1501 protocol, one query at a time (the formula)."""
    aps = []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        match = (g_pids[order] == q_pids[i])[keep]
        if not match.any():
            continue
        hits = np.cumsum(match)
        aps.append(np.mean([hits[k] / (k + 1) for k in np.flatnonzero(match)]))
    return float(np.mean(aps))


def test_evaluate_with_rerank():
    qf, gf, q_pids, g_pids = _clustered(16, 64, seed=3)
    g = torch.Generator().manual_seed(1)
    q_cams, g_cams = torch.randint(0, 3, (16,), generator=g), torch.randint(0, 3, (64,), generator=g)
    labels = (q_pids.numpy(), g_pids.numpy(), q_cams.numpy(), g_cams.numpy())
    # True: TransReID's setting, on L2-normalised features for the cosine metric
    qn, gn = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    expected = _map_from_distances(reference_re_ranking(qn, gn, 50, 15, 0.3, storage=np.float64), *labels)
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank=True)
    assert got.mAP == pytest.approx(expected, abs=1e-9)
    # a dict with other values, on raw features for the euclidean metric
    expected = _map_from_distances(reference_re_ranking(qf, gf, 8, 3, 0.5, storage=np.float64), *labels)
    got = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="euclidean",
                   rerank={"k1": 8, "k2": 3, "lambda_value": 0.5})
    assert got.mAP == pytest.approx(expected, abs=1e-9)
    plain = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
    assert plain.mAP != got.mAP
    with pytest.raises(InputError, match="k1"):
        evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, rerank={"k": 3})


def test_query_expansion():
    qf, gf, _, _ = _clustered(5, 30, seed=2)
    got = query_expansion(qf, gf, k=3)
    q = qf.numpy() / np.linalg.norm(qf.numpy(), axis=1, keepdims=True)
    g = gf.numpy() / np.linalg.norm(gf.numpy(), axis=1, keepdims=True)
    for i in range(5):
        top = np.argsort(-(g @ q[i]))[:3]
        e = q[i] + g[top].sum(axis=0)
        np.testing.assert_allclose(got[i].numpy(), e / np.linalg.norm(e), rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="k"):
        query_expansion(qf, gf, k=31)


def test_refuses_bad_inputs():
    qf, gf, _, _ = _clustered(3, 10)
    with pytest.raises(InputError, match="k1 >= 1"):
        re_ranking(qf, gf, k1=0)
    with pytest.raises(InputError, match="wide"):
        re_ranking(qf, gf[:, :8], k1=3, k2=2)
    with pytest.raises(InputError, match="NaN"):
        re_ranking(qf * float("nan"), gf, k1=3, k2=2)
