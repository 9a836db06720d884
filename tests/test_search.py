"""Chunked exact top-k and the optional FAISS index against a full sort of the whole distance matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_ms import ConfigError, InputError
from reid_ms.search import FaissIndex, topk


def _data(num_q=37, num_g=211, dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_q, dim, generator=g), torch.randn(num_g, dim, generator=g)


def _exact(qf, gf, k, metric):
    """The oracle: every distance in float64, fully sorted."""
    q, g = qf.double().numpy(), gf.double().numpy()
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        d = 1.0 - q @ g.T
    else:
        d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, axis=1), idx


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1024, 16384), (5, 17), (1, 3)])
def test_chunked_topk_equals_the_full_sort(metric, query_chunk, gallery_chunk):
    qf, gf = _data()
    d, i = topk(qf, gf, k=7, metric=metric, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    ed, ei = _exact(qf, gf, 7, metric)
    assert d.shape == i.shape == (37, 7) and i.dtype == torch.int64
    np.testing.assert_array_equal(i.numpy(), ei)
    np.testing.assert_allclose(d.numpy(), ed, rtol=1e-5, atol=1e-4)


def test_ties_are_ordered_by_gallery_index():
    qf = torch.tensor([[1.0, 0.0]])
    gf = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 3.0]])   # 1 and 3 tie, 0, 2, 4 tie
    _, i = topk(qf, gf, k=4, gallery_chunk=2)
    assert i.tolist() == [[1, 3, 0, 2]]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_faiss_index_equals_the_full_sort(metric):
    pytest.importorskip("faiss")
    qf, gf = _data(seed=1)
    index = FaissIndex(gf, metric=metric)
    assert index.size == 211
    d, i = index.search(qf, k=5)
    ed, ei = _exact(qf, gf, 5, metric)
    np.testing.assert_array_equal(i.numpy(), ei)
    np.testing.assert_allclose(d.numpy(), ed, rtol=1e-5, atol=1e-4)


def test_faiss_missing_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ConfigError, match="faiss-cpu"):
        FaissIndex(torch.randn(4, 3))


def test_bad_arguments():
    qf, gf = _data()
    with pytest.raises(InputError, match="k must be"):
        topk(qf, gf, k=212)
    with pytest.raises(InputError, match="wide"):
        topk(qf, gf[:, :5])
    with pytest.raises(InputError, match="metric"):
        topk(qf, gf, metric="manhattan")
