"""reid_ms.optim: TransReID's parameter groups and both schedules, against values worked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reid_ms import optim
from reid_ms.errors import ConfigError


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)                    # weight + bias
        self.norm = nn.LayerNorm(4)                    # weight + bias
        self.classifier = nn.Linear(4, 5, bias=True)   # weight + bias
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _lookup(groups, param):
    return [(g["lr"], g["weight_decay"]) for g in groups if any(p is param for p in g["params"])]


def test_param_groups_rules():
    model = _Toy()
    groups = optim.param_groups(model, base_lr=0.008, weight_decay=1e-4, bias_lr_factor=2.0, weight_decay_bias=0.0)
    assert _lookup(groups, model.body.weight) == [(0.008, 1e-4)]
    assert _lookup(groups, model.norm.weight) == [(0.008, 1e-4)]
    assert _lookup(groups, model.body.bias) == [(0.016, 0.0)]
    assert _lookup(groups, model.classifier.weight) == [(0.008, 1e-4)]
    assert _lookup(groups, model.classifier.bias) == [(0.016, 0.0)]
    assert _lookup(groups, model.frozen.weight) == [] and _lookup(groups, model.frozen.bias) == []
    assert sum(len(g["params"]) for g in groups) == 6
    assert all(g["base_lr"] == 0.008 for g in groups)


def test_param_groups_large_fc_lr():
    model = _Toy()
    groups = optim.param_groups(model, base_lr=0.01, weight_decay=5e-4, weight_decay_bias=1e-4, large_fc_lr=True)
    # the classifier rule sets the rate only; the bias's weight decay stays the bias rule's
    assert _lookup(groups, model.classifier.weight) == [(0.02, 5e-4)]
    assert _lookup(groups, model.classifier.bias) == [(0.02, 1e-4)]
    assert _lookup(groups, model.body.bias) == [(0.02, 1e-4)]
    assert _lookup(groups, model.body.weight) == [(0.01, 5e-4)]


def test_param_groups_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable"):
        optim.param_groups(frozen, 0.1)
    with pytest.raises(ConfigError):
        optim.param_groups(nn.Linear(2, 2), 0.0)


def _sgd(base_lr=0.008):
    return torch.optim.SGD(optim.param_groups(_Toy(), base_lr=base_lr), momentum=0.9)


def _lrs(opt):
    return sorted({g["lr"] for g in opt.param_groups})


def test_cosine_schedule_hand_values():
    opt = _sgd(0.008)      # groups at 0.008 and, for biases, 0.016
    sched = optim.build_scheduler(opt, "cosine", epochs=120)
    # before the first step the groups hold warmup_lr_init = 0.01 * 0.008
    assert _lrs(opt) == pytest.approx([8e-5])
    # warm-up (epochs 1-4): 8e-5 + e * (lr - 8e-5) / 5
    sched.step(1)
    assert _lrs(opt) == pytest.approx([0.001664, 0.003264])
    sched.step(4)
    assert _lrs(opt) == pytest.approx([0.006416, 0.012816])
    # epoch 60 of 120: cos(pi / 2) = 0 -> lr_min + (lr - lr_min) / 2 with lr_min = 0.002 * 0.008 = 1.6e-5
    sched.step(60)
    assert _lrs(opt) == pytest.approx([0.004008, 0.008008])
    # epoch 5, the first after the warm-up: the cosine at t = 5 (the warm-up is not a prefix)
    sched.step(5)
    c = 0.5 * (1 + math.cos(math.pi * 5 / 120))
    assert _lrs(opt) == pytest.approx([1.6e-5 + (0.008 - 1.6e-5) * c, 1.6e-5 + (0.016 - 1.6e-5) * c])
    # the last epoch is at the floor, the same for every group
    sched.step(120)
    assert _lrs(opt) == pytest.approx([1.6e-5])


def test_cosine_schedule_explicit_and_state():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = optim.build_scheduler(opt, "cosine", epochs=10, warmup_epochs=2, lr_min=0.0, warmup_lr_init=0.05)
    sched.step(1)
    assert _lrs(opt) == pytest.approx([0.075])
    sched.step(2)     # cos(pi * 2 / 10) = 0.809017
    assert _lrs(opt) == pytest.approx([0.1 * (1 + 0.8090169943749475) / 2])
    # a fresh scheduler restored from the state sets the same rate at the next epoch
    state = sched.state_dict()
    opt2 = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched2 = optim.build_scheduler(opt2, "cosine", epochs=10, warmup_epochs=2, lr_min=0.0, warmup_lr_init=0.05)
    sched2.load_state_dict(state)
    sched.step(7)
    sched2.step(7)
    assert _lrs(opt) == _lrs(opt2) == pytest.approx([0.1 * (1 + math.cos(math.pi * 0.7)) / 2])


def test_cosine_needs_a_base_for_mixed_groups():
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.2}])
    with pytest.raises(ConfigError, match="lr_min"):
        optim.build_scheduler(opt, "cosine", epochs=10)
    optim.build_scheduler(opt, "cosine", epochs=10, lr_min=0.0, warmup_lr_init=0.0)


@pytest.mark.parametrize("epoch, factor", [
    (1, 0.19),          # warm-up: 0.1 * (1 - 0.1) + 0.1
    (5, 0.55),          # 0.1 * 0.5 + 0.5
    (9, 0.91),
    (10, 1.0),          # warm-up over
    (29, 1.0),
    (30, 0.1),          # first milestone
    (49, 0.1),
    (50, 0.01),         # second milestone
    (60, 0.01),
])
def test_warmup_multistep_hand_values(epoch, factor):
    opt = torch.optim.Adam(optim.param_groups(_Toy(), base_lr=5e-6))
    sched = optim.build_scheduler(opt, "warmup_multistep", epochs=60)
    assert _lrs(opt) == pytest.approx([5e-7, 1e-6])    # built: the value at 0, warmup_factor 0.1
    sched.step(epoch)
    assert _lrs(opt) == pytest.approx([5e-6 * factor, 1e-5 * factor])


def test_warmup_multistep_constant_and_errors():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = optim.WarmupMultiStepLR(opt, milestones=[3], gamma=0.5, warmup_factor=0.2, warmup_iters=2,
                                    warmup_method="constant")
    expected = {0: 0.2, 1: 0.2, 2: 1.0, 3: 0.5, 4: 0.5}
    for epoch, lr in expected.items():
        sched.step(epoch)
        assert _lrs(opt) == pytest.approx([lr])
    with pytest.raises(ConfigError, match="increasing"):
        optim.WarmupMultiStepLR(opt, milestones=[5, 3])
    with pytest.raises(ConfigError, match="beyond"):
        optim.build_scheduler(opt, "warmup_multistep", epochs=40, milestones=(30, 50))
    with pytest.raises(ConfigError, match="unknown schedule"):
        optim.build_scheduler(opt, "step", epochs=10)
