"""P x K identity samplers: batches of P identities with K images each, as the triplet loss needs.

The epoch's order follows TransReID's ``RandomIdentitySampler``: each identity's images are shuffled
(drawn with replacement up to K when it has fewer) and cut into groups of K, the rest dropped; then,
while at least P identities have groups left, P of them are picked at random and one group of each is
appended. Every ``batch_size`` consecutive indices therefore hold P distinct identities with K images
each. The randomness comes from a generator seeded by ``(seed, epoch)``, so an epoch's order depends on
nothing else and a resumed run draws the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from reid_ms.errors import ConfigError

__all__ = ["RandomIdentitySampler", "DistributedRandomIdentitySampler"]


class RandomIdentitySampler(Sampler[int]):
    """Indices into the training list in P x K blocks, ``P = batch_size // num_instances``, ``K = num_instances``.

    Args:
        pids: the identity of every training sample (``[s.pid for s in dataset.train]``).
        batch_size: images per batch; a multiple of ``num_instances``.
        num_instances: K, images of each identity in a batch.
        seed: with the epoch, fixes the order.

    ``set_epoch(epoch, start=0)`` selects the epoch's order before iterating; ``start`` skips the first
    ``start`` indices, for resuming within an epoch. ``len()`` is the exact number of indices the
    iteration yields (a multiple of ``batch_size`` when ``start`` is).
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0) -> None:
        if num_instances < 1:
            raise ConfigError(f"num_instances must be >= 1, got {num_instances}")
        if batch_size < num_instances or batch_size % num_instances:
            raise ConfigError(f"batch_size ({batch_size}) must be a positive multiple of num_instances ({num_instances})")
        self.pids = [int(p) for p in pids]
        self.batch_size = batch_size
        self.num_instances = num_instances
        self.seed = seed
        self.epoch = 0
        self.start = 0
        self._index_by_pid: dict[int, list[int]] = {}
        for index, pid in enumerate(self.pids):
            self._index_by_pid.setdefault(pid, []).append(index)
        per_batch = batch_size // num_instances
        if len(self._index_by_pid) < per_batch:
            raise ConfigError(f"a batch of {batch_size} with {num_instances} images per identity needs "
                              f"{per_batch} identities, the data has {len(self._index_by_pid)}")
        self._cache: tuple[int, list[int]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if start < 0:
            raise ConfigError(f"start must be >= 0, got {start}")
        self.epoch = epoch
        self.start = start

    def epoch_indices(self, epoch: Optional[int] = None) -> list[int]:
        """The whole order of ``epoch`` (default: the current one), before ``start`` is applied."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._draw(epoch))
        return self._cache[1]

    def _draw(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, epoch])
        k = self.num_instances
        groups: dict[int, list[list[int]]] = {}
        for pid in sorted(self._index_by_pid):
            idxs = self._index_by_pid[pid]
            picked = rng.choice(idxs, size=k, replace=True) if len(idxs) < k else rng.permutation(idxs)
            drawn = [int(i) for i in picked]
            groups[pid] = [drawn[i:i + k] for i in range(0, len(drawn) - k + 1, k)]
        available = sorted(groups)
        per_batch = self.batch_size // k
        order: list[int] = []
        while len(available) >= per_batch:
            chosen = [available[i] for i in rng.choice(len(available), size=per_batch, replace=False)]
            for pid in chosen:
                order.extend(groups[pid].pop(0))
                if not groups[pid]:
                    available.remove(pid)
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.epoch_indices()) - self.start)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.epoch, self.start = int(state["seed"]), int(state["epoch"]), int(state["start"])
        self._cache = None


class DistributedRandomIdentitySampler(RandomIdentitySampler):
    """The P x K sampler split over ``num_replicas`` processes, each rank getting whole identity groups.

    ``batch_size`` is the global batch (TransReID's ``IMS_PER_BATCH`` under DDP): every rank draws the
    same global order (same seed and epoch) and takes its ``batch_size // num_replicas`` consecutive
    indices of each global batch, a whole number of K-image groups. Give each rank's DataLoader
    ``batch_size // num_replicas``. ``num_replicas`` and ``rank`` default to the initialised process group.
    With one replica it is the plain sampler.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, num_replicas: Optional[int] = None,
                 rank: Optional[int] = None, seed: int = 0) -> None:
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise ConfigError("DistributedRandomIdentitySampler needs num_replicas and rank, or an "
                                  "initialised torch.distributed process group")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must lie in [0, num_replicas), got rank {rank} of {num_replicas}")
        local = batch_size // num_replicas
        if batch_size % num_replicas or local % num_instances or local == 0:
            raise ConfigError(f"the global batch ({batch_size}) must split into {num_replicas} equal per-rank "
                              f"batches of whole {num_instances}-image identity groups")
        super().__init__(pids, batch_size, num_instances, seed)
        self.num_replicas = num_replicas
        self.rank = rank

    def epoch_indices(self, epoch: Optional[int] = None) -> list[int]:
        """This rank's whole order of ``epoch`` (default: the current one), before ``start`` is applied."""
        order = super().epoch_indices(epoch)
        local = self.batch_size // self.num_replicas
        begin = self.rank * local
        return [i for b in range(0, len(order), self.batch_size) for i in order[b + begin:b + begin + local]]
