"""Parameter groups and learning-rate schedules of TransReID and CLIP-ReID.

- :func:`param_groups`: TransReID's (and CLIP-ReID's stage-2) rules: biases get ``bias_lr_factor`` times
  the learning rate and their own weight decay; optionally classifiers twice the learning rate.
- :func:`build_scheduler`: ``"cosine"``, TransReID's warm-up cosine (timm's ``CosineLRScheduler`` with
  TransReID's arguments), or ``"warmup_multistep"``, CLIP-ReID's ``WarmupMultiStepLR``.

Both schedules follow timm's convention: ``scheduler.step(epoch)`` is called at the start of epoch
``epoch`` (1-based) and sets the learning rates that epoch trains with, so resuming at any epoch needs
no replay of earlier steps.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Optional

import torch
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from reid_ms.errors import ConfigError

__all__ = ["param_groups", "build_scheduler", "WarmupMultiStepLR", "SCHEDULES"]

SCHEDULES = ("cosine", "warmup_multistep")


def param_groups(model: nn.Module, base_lr: float, weight_decay: float = 1e-4, bias_lr_factor: float = 2.0,
                 weight_decay_bias: float = 1e-4, large_fc_lr: bool = False) -> list[dict[str, Any]]:
    """Optimizer parameter groups by TransReID's rules, for ``torch.optim.SGD(groups, momentum=0.9)``.

    A parameter whose name contains ``bias`` gets ``base_lr * bias_lr_factor`` and ``weight_decay_bias``;
    with ``large_fc_lr``, one whose name contains ``classifier`` (or ``arcface``) gets ``2 * base_lr``
    (its weight decay stays as the first rule set it). Frozen parameters (``requires_grad=False``) are
    left out. TransReID makes one group per parameter; parameters with the same learning rate and
    weight decay are merged here (same updates, fewer groups), in order of first appearance.

    Every group also records ``base_lr``, which :func:`build_scheduler` scales for the cosine schedule's
    floor and warm-up start.
    """
    if base_lr <= 0:
        raise ConfigError(f"base_lr must be > 0, got {base_lr}")
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, decay = base_lr, weight_decay
        if "bias" in name:
            lr, decay = base_lr * bias_lr_factor, weight_decay_bias
        if large_fc_lr and ("classifier" in name or "arcface" in name):
            lr = base_lr * 2.0
        group = groups.setdefault((lr, decay), {"params": [], "lr": lr, "weight_decay": decay, "base_lr": base_lr})
        group["params"].append(param)
    if not groups:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (all have requires_grad=False)")
    return list(groups.values())


class WarmupMultiStepLR(Scheduler):
    """CLIP-ReID's ``WarmupMultiStepLR`` on timm's scheduler interface (``step(epoch)`` at an epoch's start).

    At epoch ``e`` each group's learning rate is ``initial_lr * w(e) * gamma ** k``, where ``k`` counts
    the milestones ``<= e`` and, during the warm-up (``e < warmup_iters``), ``w(e)`` is
    ``warmup_factor * (1 - e / warmup_iters) + e / warmup_iters`` (``"linear"``) or ``warmup_factor``
    (``"constant"``), else 1. CLIP-ReID steps its PyTorch scheduler once at the start of every epoch,
    so epoch ``e`` trains with the value at ``e``; built here, the groups hold the value at 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int] = (30, 50), gamma: float = 0.1,
                 warmup_factor: float = 0.1, warmup_iters: int = 10, warmup_method: str = "linear") -> None:
        milestones = list(milestones)
        if milestones != sorted(milestones):
            raise ConfigError(f"milestones must be increasing, got {milestones}")
        if warmup_method not in ("linear", "constant"):
            raise ConfigError(f"warmup_method must be 'linear' or 'constant', got {warmup_method!r}")
        if warmup_iters < 0:
            raise ConfigError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.milestones = milestones
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_iters = warmup_iters
        self.warmup_method = warmup_method
        super().__init__(optimizer, param_group_field="lr")
        self.update_groups(self._get_lr(0))

    def _get_lr(self, t: int) -> list[float]:
        factor = 1.0
        if t < self.warmup_iters:
            if self.warmup_method == "constant":
                factor = self.warmup_factor
            else:
                alpha = t / self.warmup_iters
                factor = self.warmup_factor * (1 - alpha) + alpha
        decay = self.gamma ** bisect.bisect_right(self.milestones, t)
        return [base * factor * decay for base in self.base_values]


def _recipe_base_lr(optimizer: torch.optim.Optimizer) -> float:
    """The base learning rate the cosine schedule's floor and warm-up start are fractions of."""
    groups = optimizer.param_groups
    recorded = {g["base_lr"] for g in groups if "base_lr" in g}
    if len(recorded) == 1 and all("base_lr" in g for g in groups):
        return float(recorded.pop())
    lrs = {g.get("initial_lr", g["lr"]) for g in groups}
    if len(lrs) == 1:
        return float(lrs.pop())
    raise ConfigError("cannot tell the base learning rate: the optimizer's groups have different learning "
                      f"rates {sorted(lrs)} and were not made by reid_ms.optim.param_groups; pass lr_min and "
                      "warmup_lr_init explicitly")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, epochs: int, warmup_epochs: int = 5,
                    lr_min: Optional[float] = None, warmup_lr_init: Optional[float] = None,
                    milestones: Sequence[int] = (30, 50), gamma: float = 0.1, warmup_factor: float = 0.1,
                    warmup_iters: int = 10) -> Scheduler:
    """A learning-rate schedule by name; call ``scheduler.step(epoch)`` at the start of each epoch (1-based).

    ``"cosine"``: TransReID's: timm's ``CosineLRScheduler(t_initial=epochs, lr_min, warmup_t=warmup_epochs,
    warmup_lr_init, cycle_limit=1)``, the warm-up counted inside the cosine (not prefixed). Defaults
    ``lr_min = 0.002 * base`` and ``warmup_lr_init = 0.01 * base``, one value for every group as in
    TransReID, where base is the ``base_lr`` recorded by :func:`param_groups` (else the groups' common
    learning rate). Epoch ``e < warmup_epochs`` trains with ``warmup_lr_init + e * (lr - warmup_lr_init) /
    warmup_epochs``, later epochs with ``lr_min + (lr - lr_min) * (1 + cos(pi * e / epochs)) / 2``.

    ``"warmup_multistep"``: CLIP-ReID's stage-2 :class:`WarmupMultiStepLR` (``milestones``, ``gamma``,
    ``warmup_factor``, ``warmup_iters`` in epochs, linear warm-up); ``epochs`` only bounds the milestones.

    Both return a timm ``Scheduler``: ``state_dict()`` / ``load_state_dict()`` save and restore it.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if name == "cosine":
        if warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if lr_min is None or warmup_lr_init is None:
            base = _recipe_base_lr(optimizer)
            lr_min = 0.002 * base if lr_min is None else lr_min
            warmup_lr_init = 0.01 * base if warmup_lr_init is None else warmup_lr_init
        return CosineLRScheduler(optimizer, t_initial=epochs, lr_min=lr_min, cycle_mul=1.0, cycle_decay=0.1,
                                 cycle_limit=1, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr_init,
                                 t_in_epochs=True)
    if name == "warmup_multistep":
        if any(m > epochs for m in milestones):
            raise ConfigError(f"milestones {list(milestones)} lie beyond the {epochs} epochs of the run")
        return WarmupMultiStepLR(optimizer, milestones=milestones, gamma=gamma, warmup_factor=warmup_factor,
                                 warmup_iters=warmup_iters)
    raise ConfigError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")

