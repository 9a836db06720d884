"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def two_threads():
    """Two intra-op threads while the test runs (the per-image attention paths' thread range includes 2;
    a CI machine may have another core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread while the test runs: for tiny tensors on a busy two-core machine the OpenMP
    hand-offs of two threads take most of the time (a tiny stage-1 run measured 0.4 s at one thread,
    14 s at two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
