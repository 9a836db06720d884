"""reid_ms.convert_sync_batchnorm: a SyncBatchNorm that synchronizes on the CPU with gloo.

The oracle is PyTorch's plain BatchNorm run in ONE process on the concatenated global batch: two gloo
processes holding slices of different sizes must get its output slices, its input-gradient slices (loss =
sum of outputs times fixed random weights, summed over the processes), parameter gradients that add up
to its, and its running statistics. One spawn runs every distributed case; the rest runs in-process.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from _helpers_dist import join_gloo, spawn
import reid_ms
import reid_ms.distributed
from reid_ms.distributed import SyncBatchNorm

WORLD = 2
TOL = dict(atol=1e-6, rtol=1e-6)
# name: (layer, channels, per-sample shape after C, per-rank batch sizes, momentum, offset, spread)
CASES = {
    "bnneck": (nn.BatchNorm1d, 8, (), (3, 5), 0.1, 0.0, 1.0),
    "map2d_cumulative": (nn.BatchNorm2d, 4, (3, 2), (2, 3), None, 0.5, 2.0),
    # channel means 10^6 times their spread: E[x^2] - E[x]^2 in float32 would lose every digit, and
    # PyTorch's float32 CPU BatchNorm itself is 0.15 off here, so its oracle runs in float64
    "large_offset": (nn.BatchNorm1d, 6, (), (4, 4), 0.1, 1e4, 1e-2),
    # one sample on rank 0: BatchNorm alone would refuse it, the global batch has 5
    "one_sample_rank": (nn.BatchNorm1d, 5, (), (1, 4), 0.3, 0.0, 1.0),
}
FLOAT64_ORACLE = {"large_offset"}
STEPS = 2


def _plain(name: str) -> nn.modules.batchnorm._BatchNorm:
    """The case's BatchNorm with random affine parameters, the same in every process."""
    layer, channels, _, _, momentum, _, _ = CASES[name]
    gen = torch.Generator().manual_seed(7)
    bn = layer(channels, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=gen))
    return bn


def _global_batch(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of every rank ``[sum(sizes), C, *]`` and the loss weights of its outputs."""
    _, channels, tail, sizes, _, offset, spread = CASES[name]
    gen = torch.Generator().manual_seed(100 + step)
    shape = (sum(sizes), channels, *tail)
    return offset + spread * torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _rows(name: str, rank: int) -> slice:
    sizes = CASES[name][3]
    return slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))


def _run_steps(bn: nn.Module, name: str, rows: slice, dtype: torch.dtype = torch.float32
               ) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` training steps on ``rows`` of the global batch: outputs, gradients and buffers of each."""
    record = []
    bn.to(dtype)
    for step in range(STEPS):
        x, w = (t.to(dtype) for t in _global_batch(name, step))
        x = x[rows].clone().requires_grad_(True)
        out = bn(x)
        (out * w[rows]).sum().backward()
        record.append({"out": out.detach(), "grad": x.grad, "weight_grad": bn.weight.grad.clone(),
                       "bias_grad": bn.bias.grad.clone(),
                       **{k: v.clone() for k, v in bn.named_buffers()}})
        bn.zero_grad()
    return record


def _worker(rank: int, port: int, out: str) -> None:
    join_gloo(rank, WORLD, port, timeout_s=60)
    try:
        result = {}
        for name in CASES:
            bn = reid_ms.convert_sync_batchnorm(_plain(name)).train()
            result[name] = _run_steps(bn, name, _rows(name, rank))

        x = _global_batch("bnneck", 0)[0][_rows("bnneck", rank)]
        # BatchNorm here, with this process's thread count (kernels round differently with another)
        result["plain_eval"], result["plain_train"] = _plain("bnneck").eval()(x), _plain("bnneck").train()(x)
        # eval mode inside the group: the running statistics, no collective
        result["eval"] = reid_ms.convert_sync_batchnorm(_plain("bnneck")).eval()(x)
        # a group of this process alone: BatchNorm's own statistics (every rank creates every group)
        alone = [dist.new_group([r]) for r in range(WORLD)][rank]
        result["alone"] = reid_ms.convert_sync_batchnorm(_plain("bnneck"), process_group=alone).train()(x)
        # one value per channel over both processes (1 + 0 rows): refused on every rank, none left waiting
        try:
            reid_ms.convert_sync_batchnorm(_plain("bnneck")).train()(x[:1] if rank == 0 else x[:0])
            result["one_value"] = "no error"
        except reid_ms.InputError as e:
            result["one_value"] = str(e)
        # a device PyTorch synchronizes on goes to torch.nn.SyncBatchNorm's forward, which refuses the CPU
        reid_ms.distributed._torch_syncs_on = lambda device_type: True
        try:
            reid_ms.convert_sync_batchnorm(_plain("bnneck")).train()(x)
            result["delegated"] = "no error"
        except ValueError as e:
            result["delegated"] = str(e)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, free_port):
    out = tmp_path_factory.mktemp("syncbn")
    spawn(_worker, (free_port(), str(out)), WORLD, timeout=120)
    return [torch.load(out / f"{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_batchnorm_over_the_global_batch(ranks, name):
    dtype = torch.float64 if name in FLOAT64_ORACLE else torch.float32
    oracle = _run_steps(_plain(name).train(), name, slice(None), dtype)
    for step in range(STEPS):
        expected = {k: v.float() if v.is_floating_point() else v for k, v in oracle[step].items()}
        for rank in range(WORLD):
            got = ranks[rank][name][step]
            rows = _rows(name, rank)
            torch.testing.assert_close(got["out"], expected["out"][rows], **TOL)
            torch.testing.assert_close(got["grad"], expected["grad"][rows], **TOL)
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(got[key], expected[key], **TOL, msg=f"{name} step {step}: {key}")
        # each process holds its own loss's parameter gradients; DDP's all-reduce adds them up
        for key in ("weight_grad", "bias_grad"):
            torch.testing.assert_close(sum(r[name][step][key] for r in ranks), expected[key], **TOL)
    assert ranks[0][name][-1]["num_batches_tracked"] == STEPS


def test_eval_alone_delegation_and_refusal_in_a_group(ranks):
    for got in ranks:
        assert torch.equal(got["eval"], got["plain_eval"])
        assert torch.equal(got["alone"], got["plain_train"])
        assert "SyncBatchNorm expected input tensor to be on GPU" in got["delegated"]
        assert "more than 1 value per channel over all processes, got 1" in got["one_value"]


@pytest.mark.parametrize("shape, momentum, affine, track", [
    ((6, 4), 0.1, True, True),
    ((5, 4, 7), None, True, True),
    ((3, 4, 5, 2), 0.2, False, True),
    ((4, 4), 0.1, True, False),
])
def test_without_a_process_group_it_is_batchnorm(shape, momentum, affine, track):
    assert not dist.is_initialized()
    layer = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    plain = layer(4, momentum=momentum, affine=affine, track_running_stats=track)
    twin = layer(4, momentum=momentum, affine=affine, track_running_stats=track)
    twin.load_state_dict(plain.state_dict())
    synced = reid_ms.convert_sync_batchnorm(twin)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(shape, generator=gen) * 3 + 1
        assert torch.equal(synced.train()(x), plain.train()(x))
        assert torch.equal(synced.eval()(x), plain.eval()(x))
    for (k, a), (k2, b) in zip(plain.state_dict().items(), synced.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_the_bnneck_converts_in_place_with_its_parameters(tiny):
    model = tiny.build("vit_b16_ms", blocks=1, num_classes=3)
    plain = model.head.bottleneck
    before = model.state_dict()
    assert reid_ms.convert_sync_batchnorm(model) is model
    synced = model.head.bottleneck
    assert type(synced) is SyncBatchNorm and not isinstance(synced, nn.SyncBatchNorm)  # DDP refuses those on CPU
    assert synced.weight is plain.weight and synced.bias is plain.bias
    assert synced.running_mean is plain.running_mean and synced.num_batches_tracked is plain.num_batches_tracked
    assert synced.weight.requires_grad and not synced.bias.requires_grad   # the BNNeck's frozen bias
    assert synced.training == plain.training and synced.momentum == plain.momentum and synced.eps == plain.eps
    assert list(model.state_dict()) == list(before)

    # checkpoints move both ways: a converted model's state into a plain one and back
    images = torch.randn(2, 3, 64, 32)
    model.train()(images)  # moves the running statistics
    other = tiny.build("vit_b16_ms", blocks=1, num_classes=3)
    other.load_state_dict(model.state_dict())
    model.head.neck_feat = other.head.neck_feat = "after"
    assert torch.equal(other.eval()(images), model.eval()(images))
    back = reid_ms.convert_sync_batchnorm(tiny.build("vit_b16_ms", blocks=1, num_classes=3))
    back.load_state_dict(other.state_dict())
    back.head.neck_feat = "after"
    assert torch.equal(back.eval()(images), other(images))


def test_every_batchnorm_kind_is_converted():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 9)),
                        nn.SyncBatchNorm(36, affine=False))
    reid_ms.convert_sync_batchnorm(net)
    assert [type(m) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [SyncBatchNorm] * 3
    assert net[3].weight is None and net[3].num_features == 36
    single = nn.BatchNorm3d(2, eps=1e-3, momentum=None)
    converted = reid_ms.convert_sync_batchnorm(single)
    assert type(converted) is SyncBatchNorm and converted.eps == 1e-3 and converted.momentum is None
    assert converted.weight is single.weight


def test_bad_input_is_refused_with_its_shape():
    bn = reid_ms.convert_sync_batchnorm(nn.BatchNorm1d(4))
    with pytest.raises(reid_ms.InputError, match=r"at least 2 dimensions, got shape \(4,\)"):
        bn(torch.randn(4))
