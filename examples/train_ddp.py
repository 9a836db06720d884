"""Train a registered re-ID model with DistributedDataParallel on several GPUs or machines.

One process per GPU, started by torchrun (it sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT):

    # one machine, 4 GPUs, Market-1501's training folder, ImageNet weights for the ViT
    torchrun --nproc_per_node 4 examples/train_ddp.py --model vit_b16_ms \\
        --data Market-1501/bounding_box_train --pretrained jx_vit_base_p16_224-80ecf9dd.pth

    # two machines with 8 GPUs each: run on both, --node_rank 0 on the one at MASTER_ADDR
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \\
        examples/train_ddp.py --model clip_b16_adapt_ms --data Market-1501/bounding_box_train

    # CPU check (gloo backend), two processes, a tiny model on random images, two steps
    torchrun --nproc_per_node 2 examples/train_ddp.py --tiny --steps 2

Loss: cross-entropy on the BNNeck logits plus a batch-hard triplet loss on the feature before the
BNNeck (TransReID's and CLIP-ReID's pair); for the JPM models (``vit_b16_jpm``, ``vit_b16_ms_jpm``) each
loss is TransReID's half global branch, half mean of the local branches. Multi-modal models are not
offered: they need an image batch per modality. ``reid_ms.convert_sync_batchnorm`` makes the BNNeck a
SyncBatchNorm, so its batch statistics cover the global batch: PyTorch's SyncBatchNorm on GPUs, reid_ms's
all-reduce version on the CPU (gloo), where PyTorch's refuses to run.
Rank 0 saves the model's state dict (``--out``); load it by name with the same arguments,
``reid_ms.build(model_name, pretrained=path, ...)``, or ``reid-ms extract/eval/export --weights path``.
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

import reid_ms
from reid_ms.data import ReidImageFolder, eval_transform
from reid_ms.registry import get_spec

logger = logging.getLogger("train_ddp")

# the models trained from one image batch: multi-modal ones take a batch per modality
MODELS = [name for name in reid_ms.list_models() if get_spec(name).model is not reid_ms.MultiModalReIDModel]
TINY = {"vit": dict(embed_dim=64, depth=2, num_heads=4, img_size=(64, 32)),
        "clip": dict(width=64, layers=2, heads=4, output_dim=32, img_size=(64, 32))}


def batch_hard_triplet(feature: torch.Tensor, pids: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Hardest positive against hardest negative per anchor, Euclidean distances (TransReID's triplet)."""
    dist_sq = (feature[:, None] - feature[None]).pow(2).sum(-1)
    dist_ = dist_sq.clamp_min(1e-12).sqrt()  # clamped: sqrt has no gradient at the zero diagonal
    same = pids[:, None] == pids[None]
    hardest_pos = dist_.masked_fill(~same, 0).amax(1)
    hardest_neg = dist_.masked_fill(same, float("inf")).amin(1)
    return F.relu(hardest_pos - hardest_neg + margin).mean()


def reid_loss(logits: torch.Tensor | tuple[torch.Tensor, ...], feature: torch.Tensor | tuple[torch.Tensor, ...],
              pids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + triplet; per branch for a JPM model: 0.5 * global + 0.5 * mean of the local (TransReID)."""
    if not isinstance(logits, tuple):
        return F.cross_entropy(logits, pids) + batch_hard_triplet(feature, pids)
    branch = [F.cross_entropy(s, pids) + batch_hard_triplet(f, pids) for s, f in zip(logits, feature)]
    return 0.5 * branch[0] + 0.5 * sum(branch[1:]) / len(branch[1:])


def synthetic_data(num: int, num_classes: int, camera_num: int, img_size: tuple[int, int]) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)  # the same set on every rank; the sampler splits it
    images = torch.randn(num, 3, *img_size, generator=gen)
    pids = torch.arange(num) % num_classes
    cams = torch.randint(0, camera_num, (num,), generator=gen)
    return TensorDataset(images, pids, cams)


class MarketTrainSet(Dataset):
    """A Market-1501-named folder as ``(image, class index, camera)`` items; junk crops (person -1) dropped.

    No augmentation, to keep the example short: add TransReID's flip / pad-crop / random erasing here.
    """

    def __init__(self, root: str, img_size: tuple[int, int]) -> None:
        self.folder = ReidImageFolder(root, eval_transform(img_size))
        self.keep = [i for i, pid in enumerate(self.folder.pids) if pid >= 0]
        self.classes = {pid: n for n, pid in enumerate(sorted({self.folder.pids[i] for i in self.keep}))}
        self.camera_num = max(self.folder.camids) + 1

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, index = self.folder[self.keep[i]]
        return image, self.classes[self.folder.pids[index]], self.folder.camids[index]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b16_ms", choices=MODELS)
    parser.add_argument("--data", help="a Market-1501-named training folder; without it, random images")
    parser.add_argument("--pretrained", help="a local backbone checkpoint (ImageNet / OpenAI CLIP)")
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=16, help="images per process and step")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.008)
    parser.add_argument("--out", help="where rank 0 saves the trained state dict")
    parser.add_argument("--tiny", action="store_true", help="a narrow model on random 64x32 images (CI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank" + os.environ.get("RANK", "0") + " %(message)s")

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    family = "vit" if args.model.startswith("vit") else "clip"
    overrides = dict(TINY[family]) if args.tiny else {"img_size": tuple(args.img_size)}
    img_size = overrides["img_size"]
    if not args.data:
        num_classes, camera_num = 4, 3
        dataset = synthetic_data(8 * world * args.batch, num_classes, camera_num, img_size)
    else:
        dataset = MarketTrainSet(args.data, img_size)
        num_classes, camera_num = len(dataset.classes), dataset.camera_num
    if get_spec(args.model).neck_mode is not None:
        overrides.setdefault("scales", (2, 4) if args.tiny else (4, 8, 16))

    # every rank builds the same model; DDP also copies rank 0's parameters to the others at wrapping
    torch.manual_seed(0)
    model = reid_ms.build(args.model, pretrained=args.pretrained, camera_num=camera_num, num_classes=num_classes,
                          **overrides)
    reid_ms.convert_sync_batchnorm(model)  # the BNNeck over the global batch, on GPUs and on the CPU
    model.to(device).train()
    ddp = DDP(model, device_ids=[local_rank] if cuda else None, find_unused_parameters=False)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                                weight_decay=1e-4)

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"{len(dataset)} images give no full batch of {args.batch} on each of {world} processes; "
                         f"lower --batch")
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)  # a different shuffle per epoch, the same on every rank
        for images, pids, cams in loader:
            images, pids, cams = images.to(device), pids.to(device), cams.to(device)
            logits, feature = ddp(images, cam_label=cams)
            loss = reid_loss(logits, feature, pids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the processes here
            optimizer.step()
            step += 1
            if rank == 0:
                logger.info("step %d/%d loss %.4f", step, args.steps, loss.item())
            if step == args.steps:
                break
        epoch += 1

    if rank == 0 and args.out:
        # SyncBatchNorm keeps BatchNorm's keys, so the file loads into a model built without it
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, args.out)
        logger.info("saved %s", args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
