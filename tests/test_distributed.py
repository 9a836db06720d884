"""DistributedDataParallel on the CPU: two processes, gloo, tiny vit_b16_ms and clip_b16_adapt_ms.

Each process builds its model from a different seed (DDP must copy rank 0's weights at wrapping), sees
different images, and takes two SGD steps on cross-entropy + batch-hard triplet with
``find_unused_parameters=False`` (a parameter without a gradient would stop the second step). The
replicas must then hold bit-identical parameters, different from the initial ones.

SyncBatchNorm: ``reid_ms.convert_sync_batchnorm`` turns the BNNeck into ``reid_ms.distributed.SyncBatchNorm``
(same parameters, frozen bias still frozen), which synchronizes on the CPU with gloo (PyTorch's own
refuses CPU tensors). DDP runs with ``broadcast_buffers=False``, so nothing copies rank 0's running
statistics: the BNNeck's buffers are bit-identical on both ranks only because each forward used the
global batch, and they equal a plain BatchNorm run over the features of both ranks, step by step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from _helpers_dist import join_gloo, spawn
import reid_ms
from reid_ms.distributed import SyncBatchNorm

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
MODELS = ["vit_b16_ms", "clip_b16_adapt_ms"]
CLASSES, CAMERAS, BATCH = 4, 3, 4


def _triplet(feature: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    d = (feature[:, None] - feature[None]).pow(2).sum(-1).clamp_min(1e-12).sqrt()
    same = pids[:, None] == pids[None]
    return F.relu(d.masked_fill(~same, 0).amax(1) - d.masked_fill(same, float("inf")).amin(1) + margin).mean()


def _convert_bnneck(model: reid_ms.ReIDModel) -> list[torch.Tensor]:
    """Make the BNNeck a SyncBatchNorm; returns the list its inputs (this rank's features) are logged to."""
    plain = model.head.bottleneck
    reid_ms.convert_sync_batchnorm(model)
    synced = model.head.bottleneck
    assert type(synced) is SyncBatchNorm and type(plain) is nn.BatchNorm1d
    assert synced.weight is plain.weight and synced.bias is plain.bias and not synced.bias.requires_grad
    features = []
    synced.register_forward_hook(lambda module, args, out: features.append(args[0].detach().clone()))
    return features


def _worker(rank: int, port: int, out: str, builds: dict[str, dict]) -> None:
    join_gloo(rank, WORLD, port, timeout_s=120)
    try:
        for name, kw in builds.items():
            torch.manual_seed(rank)  # replicas start different: DDP must broadcast rank 0's weights
            model = reid_ms.build(name, camera_num=CAMERAS, num_classes=CLASSES, **kw)
            features = _convert_bnneck(model)
            model.train()
            start = {k: v.detach().clone() for k, v in model.named_parameters()}
            # no buffer broadcast: equal BNNeck statistics on the ranks can only come from the sync
            ddp = DDP(model, find_unused_parameters=False, broadcast_buffers=False)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
            gen = torch.Generator().manual_seed(100 + rank)  # every rank its own data
            for _ in range(2):
                images = torch.randn(BATCH, 3, 64, 32, generator=gen)
                pids = torch.tensor([0, 0, 1, 1]) + 2 * rank
                cams = torch.randint(0, CAMERAS, (BATCH,), generator=gen)
                logits, feature = ddp(images, cam_label=cams)
                loss = F.cross_entropy(logits, pids) + _triplet(feature, pids)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            torch.save({"route": type(model.head.bottleneck).__name__, "features": features, "start": start,
                        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                        "buffers": {k: v.clone() for k, v in model.named_buffers()}},
                       os.path.join(out, f"{name}.{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, free_port, tiny):
    out = tmp_path_factory.mktemp("ddp")
    builds = {name: tiny.args(name, **({"drop_path_rate": 0.0} if name.startswith("vit") else {})) for name in MODELS}
    spawn(_worker, (free_port(), str(out), builds), WORLD, timeout=240)
    return {name: [torch.load(out / f"{name}.{r}.pt", weights_only=True) for r in range(WORLD)] for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_replicas_hold_identical_parameters_after_two_steps(replicas, name, capsys):
    first, second = replicas[name]
    assert first["params"].keys() == second["params"].keys()
    for k in first["params"]:
        assert torch.equal(first["params"][k], second["params"][k]), f"{name}: replicas differ in {k}"
    # the replicas started apart (different seeds) and the steps moved the weights
    assert not torch.equal(first["start"]["head.classifier.weight"], second["start"]["head.classifier.weight"])
    moved = [k for k in first["params"] if not torch.equal(first["params"][k], first["start"][k])]
    assert len(moved) > len(first["params"]) // 2
    assert "head.classifier.weight" in moved and "head.bottleneck.weight" in moved
    assert first["route"] == second["route"] == "SyncBatchNorm"
    for k in first["buffers"]:
        assert torch.equal(first["buffers"][k], second["buffers"][k]), k
    # the running statistics are those of one BatchNorm fed both ranks' features at each step
    oracle = nn.BatchNorm1d(first["features"][0].shape[1]).train()
    for step in range(2):
        assert not torch.equal(first["features"][step], second["features"][step])  # the ranks saw different data
        oracle(torch.cat([first["features"][step], second["features"][step]]))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(first["buffers"][f"head.bottleneck.{k}"], getattr(oracle, k), atol=1e-6, rtol=1e-6)
    with capsys.disabled():
        print(f"\nddp {name}: {WORLD} gloo processes, BNNeck: {first['route']}, broadcast_buffers=False")


def test_train_ddp_example_runs_under_torchrun(tmp_path, free_port):
    out = tmp_path / "trained.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(ROOT / "examples" / "train_ddp.py"), "--tiny", "--steps", "2", "--batch", "4",
         "--model", "vit_b16_ms", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2 loss" in result.stderr
    model = reid_ms.build("vit_b16_ms", img_size=(64, 32), embed_dim=64, depth=2, num_heads=4, scales=(2, 4),
                          camera_num=3, num_classes=4)
    model.load_state_dict(torch.load(out, weights_only=True))  # strict: every key of the trained model
