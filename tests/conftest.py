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
