"""P x K identity samplers: batch structure, determinism, resuming, and the per-rank split."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reid_ms.data import DistributedRandomIdentitySampler, RandomIdentitySampler
from reid_ms.errors import ConfigError


def _pids(counts: list[int]) -> list[int]:
    # identity i has counts[i] images, interleaved so indices of one id are not contiguous
    out = []
    for round_ in range(max(counts)):
        out += [pid for pid, c in enumerate(counts) if c > round_]
    return out


def _check_batches(order: list[int], pids: list[int], batch_size: int, k: int) -> None:
    assert len(order) % batch_size == 0
    for b in range(0, len(order), batch_size):
        counts = Counter(pids[i] for i in order[b:b + batch_size])
        assert len(counts) == batch_size // k and set(counts.values()) == {k}


@settings(max_examples=30, derandomize=True, deadline=None)
@given(counts=st.lists(st.integers(1, 9), min_size=4, max_size=12), k=st.integers(1, 4), p=st.integers(1, 4),
       seed=st.integers(0, 100), epoch=st.integers(0, 5))
def test_blocks_hold_p_ids_with_k_images(counts, k, p, seed, epoch):
    pids = _pids(counts)
    sampler = RandomIdentitySampler(pids, batch_size=p * k, num_instances=k, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert len(sampler) == len(order) > 0
    _check_batches(order, pids, p * k, k)
    # an id with at least k images never repeats an image within the epoch; one with fewer is padded
    for pid, n in enumerate(counts):
        taken = [i for i in order if pids[i] == pid]
        if n >= k:
            assert len(taken) == len(set(taken)) and len(taken) <= n - n % k
        else:
            assert len(taken) in (0, k)


def test_every_id_is_used_when_the_draw_allows():
    # 8 ids x 4 images, P = 4, K = 4: every group fits into exactly two batches, so all 32 indices appear
    pids = _pids([4] * 8)
    sampler = RandomIdentitySampler(pids, batch_size=16, num_instances=4)
    assert sorted(sampler) == list(range(32))


def test_epochs_reshuffle_deterministically():
    pids = _pids([5, 6, 7, 4, 8, 5, 6, 3])
    a = RandomIdentitySampler(pids, batch_size=8, num_instances=2, seed=3)
    b = RandomIdentitySampler(pids, batch_size=8, num_instances=2, seed=3)
    c = RandomIdentitySampler(pids, batch_size=8, num_instances=2, seed=4)
    first = list(a)
    assert first == list(b) and first != list(c)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    # resuming inside an epoch: skip what was consumed, the rest is unchanged
    a.set_epoch(1, start=8)
    b.set_epoch(1)
    assert list(a) == list(b)[8:] and len(a) == len(b) - 8
    fresh = RandomIdentitySampler(pids, batch_size=8, num_instances=2, seed=0)
    fresh.load_state_dict(a.state_dict())
    assert list(fresh) == list(a)


def test_images_of_an_id_are_regrouped_each_epoch():
    # id 0 has 8 images, K = 4: which images share a group with its first image must change over epochs
    pids = _pids([8, 4, 4, 4])
    sampler = RandomIdentitySampler(pids, batch_size=4, num_instances=4)   # P = 1: every group is used
    first = pids.index(0)
    partners = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        order = list(sampler)
        at = order.index(first)
        partners.add(frozenset(order[at - at % 4:at - at % 4 + 4]))
    assert len(partners) > 1


def test_sampler_errors():
    with pytest.raises(ConfigError, match="multiple"):
        RandomIdentitySampler([0, 1, 2], batch_size=6, num_instances=4)
    with pytest.raises(ConfigError, match="needs 4 identities, the data has 3"):
        RandomIdentitySampler([0, 1, 2], batch_size=8, num_instances=2)


@pytest.mark.parametrize("replicas", [1, 2, 4])
def test_distributed_ranks_split_each_global_batch(replicas):
    pids = _pids([5, 6, 7, 4, 8, 5, 6, 3, 9, 4, 4, 4])
    plain = RandomIdentitySampler(pids, batch_size=16, num_instances=2, seed=7)
    ranks = [DistributedRandomIdentitySampler(pids, 16, 2, num_replicas=replicas, rank=r, seed=7)
             for r in range(replicas)]
    for s in ranks + [plain]:
        s.set_epoch(2)
    global_order, local = list(plain), [list(s) for s in ranks]
    assert all(len(x) == len(global_order) // replicas == len(s) for x, s in zip(local, ranks))
    per_rank = 16 // replicas
    for step in range(len(global_order) // 16):
        # the ranks' batches of one step, side by side, are the global batch
        joined = [i for x in local for i in x[step * per_rank:(step + 1) * per_rank]]
        assert joined == global_order[step * 16:(step + 1) * 16]
        # and each rank holds whole identity groups of K = 2
        for x in local:
            counts = Counter(pids[i] for i in x[step * per_rank:(step + 1) * per_rank])
            assert set(counts.values()) == {2}


def test_distributed_errors():
    with pytest.raises(ConfigError, match="whole 4-image"):
        DistributedRandomIdentitySampler(_pids([4] * 8), 16, 4, num_replicas=8, rank=0)
    with pytest.raises(ConfigError, match="rank"):
        DistributedRandomIdentitySampler(_pids([4] * 8), 16, 4, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="process group"):
        DistributedRandomIdentitySampler(_pids([4] * 8), 16, 4)
