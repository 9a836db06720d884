"""Does the data pipeline keep a training step fed? Images/s of decoding + augmentation vs. a ViT step.

Two numbers from one run, on the same machine state:

- data: a DataLoader over ``reid_ms.data.ImageDataset`` with TransReID's ``train_transform`` at 256x128,
  the P x K ``RandomIdentitySampler`` (64 = 16 x 4) and ``--workers`` worker processes, reading 128x64
  JPEG crops (Market-1501's size) from disk; the first batch (worker start-up) is not timed;
- model: one full-size training step of ``vit_b16`` (ViT-B/16, stride 16) on a batch of 64 at 256x128:
  forward in training mode, ID + soft-margin triplet loss, backward, SGD step (median of ``--steps``,
  after one untimed step).

The ratio data images/s / model images/s says how many times faster the loader delivers than the step
consumes. The machine may be shared: the load average before and after is printed and saved.

    python bench/bench_data.py                       # writes bench/results/data_pipeline.{json,md}
    python bench/bench_data.py --workers 4 --out /tmp/data

Target: ratio >= 3 with ``--workers 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import reid_ms
from reid_ms import data, losses

logger = logging.getLogger("bench_data")
ROOT = Path(__file__).resolve().parent.parent
BATCH, NUM_INSTANCES, IMG_SIZE = 64, 4, (256, 128)


def write_crops(folder: Path, num_ids: int, per_id: int, seed: int = 0) -> None:
    """Market-1501-named 128x64 JPEGs with textured content (so decoding costs what a real crop costs)."""
    rng = np.random.default_rng(seed)
    for pid in range(1, num_ids + 1):
        colours = rng.uniform(0, 255, (4, 3))
        for i in range(per_id):
            img = np.repeat(colours, 32, axis=0)[:, None, :].repeat(64, axis=1)
            img = img + rng.normal(0, 20, img.shape)
            name = f"{pid:04d}_c{i % 6 + 1}s1_{i:06d}_01.jpg"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name, quality=90)


def data_images_per_s(root: Path, workers: int, batches: int) -> float:
    ds = data.load_dataset("market1501", root)
    sampler = data.RandomIdentitySampler([s.pid for s in ds.train], BATCH, NUM_INSTANCES, seed=0)
    loader = torch.utils.data.DataLoader(data.ImageDataset(ds.train, data.train_transform(IMG_SIZE)),
                                         batch_size=BATCH, sampler=sampler, num_workers=workers, drop_last=True)
    if len(loader) < batches + 1:
        raise SystemExit(f"the set gives {len(loader)} batches, {batches + 1} needed; raise --ids")
    it = iter(loader)
    next(it)                                    # worker start-up and the first batch: not timed
    start = time.perf_counter()
    for _ in range(batches):
        images, *_ = next(it)
        assert images.shape == (BATCH, 3, *IMG_SIZE)
    elapsed = time.perf_counter() - start
    del it
    return batches * BATCH / elapsed


def model_images_per_s(steps: int, model_name: str) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    model = reid_ms.build(model_name, num_classes=751).train()
    criterion = losses.ReIDLoss(751, margin=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.008, momentum=0.9)
    images = torch.randn(BATCH, 3, *IMG_SIZE)
    pids = torch.arange(BATCH // NUM_INSTANCES).repeat_interleave(NUM_INSTANCES)

    def step() -> None:
        logits, features = model(images)
        loss = criterion(logits, features, pids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        logger.info("model step: %.1f s", times[-1])
    return BATCH / statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ids", type=int, default=256, help="identities of 4 crops each in the temporary set")
    parser.add_argument("--batches", type=int, default=12, help="timed loader batches of 64")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--model", default="vit_b16")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_pipeline")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for sub in ("bounding_box_train", "query", "bounding_box_test"):
            (root / sub).mkdir()
        write_crops(root / "bounding_box_train", args.ids, NUM_INSTANCES)
        write_crops(root / "query", 2, 1, seed=1)
        write_crops(root / "bounding_box_test", 2, 1, seed=2)
        # data, model, data again: the two loader runs bracket the step, the mean is reported
        data_runs = [data_images_per_s(root, args.workers, args.batches)]
        logger.info("data: %.1f images/s", data_runs[-1])
        model_ips, step_times = model_images_per_s(args.steps, args.model)
        logger.info("model: %.2f images/s", model_ips)
        data_runs.append(data_images_per_s(root, args.workers, args.batches))
        logger.info("data: %.1f images/s", data_runs[-1])
    load_after = os.getloadavg()
    data_ips = statistics.mean(data_runs)
    result = {
        "workers": args.workers, "batch": BATCH, "img_size": list(IMG_SIZE), "model": args.model,
        "data_images_per_s": round(data_ips, 1), "data_runs": [round(x, 1) for x in data_runs],
        "model_images_per_s": round(model_ips, 2), "model_step_s": [round(t, 2) for t in step_times],
        "ratio_data_over_model": round(data_ips / model_ips, 1),
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
    }
    table = (
        "| loader workers | data images/s | model | training step images/s | data / model | load average (1 min) before, after |\n"
        "|---:|---:|---|---:|---:|---|\n"
        f"| {args.workers} | {data_ips:.1f} | {args.model} b{BATCH} 256x128 fp32, {torch.get_num_threads()} threads "
        f"| {model_ips:.2f} | {data_ips / model_ips:.1f}x | {load_before[0]:.1f}, {load_after[0]:.1f} |\n"
    )
    print(json.dumps(result))
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
