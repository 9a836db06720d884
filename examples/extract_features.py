"""Extract re-ID features from a query and a gallery folder, then score the retrieval (CMC and mAP).

    python examples/extract_features.py                                  # the shipped sample set, vit_b16_ms
    python examples/extract_features.py --model clip_b16_ms --checkpoint ViT-B-16.pt
    python examples/extract_features.py --data /data/market1501 --query-dir query --gallery-dir bounding_box_test \\
        --model vit_b16 --stride 12 --camera-num 6 --checkpoint transreid_vit_market.pth
    python examples/extract_features.py --tiny                           # a small random model, for CI

The images must follow Market-1501 naming (``0001_c1s1_000151_01.jpg``: person 1, camera 1); junk crops
(person -1) are dropped as TransReID's and CLIP-ReID's loaders drop them. Without ``--checkpoint`` the
model is randomly initialised: the pipeline runs, but the scores only show that it does.

This is the library route (``reid_ms.build``, ``reid_ms.data``, ``reid_ms.metrics``); the ``reid-ms``
command does the same with resumable feature files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import reid_ms
from reid_ms.data import JUNK_PID, ReidImageFolder, eval_transform
from reid_ms.registry import get_spec

SAMPLE_DATA = reid_ms.sample_data().root
# models fed one image folder; multi-modal ones need a folder per modality (rgb, nir, tir)
MODELS = [name for name in reid_ms.list_models() if get_spec(name).model is not reid_ms.MultiModalReIDModel]
TINY = {"vit": dict(embed_dim=64, depth=2, num_heads=4), "clip": dict(width=64, layers=2, heads=4, output_dim=32)}


def extract(model: torch.nn.Module, folder: Path, batch_size: int, device: str) -> tuple[np.ndarray, ...]:
    """Features ``[N, feat_dim]``, person ids ``[N]`` and 0-based cameras ``[N]`` of the images in ``folder``."""
    dataset = ReidImageFolder(folder, eval_transform(model.backbone.img_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    camids = torch.tensor(dataset.camids)
    feats = []
    with torch.inference_mode():
        for images, index in loader:
            # only a model built with a camera table (camera_num > 0) takes camera labels
            cams = camids[index].to(device) if model.backbone.camera_num > 0 else None
            feats.append(model(images.to(device), cam_label=cams).float().cpu())
    return torch.cat(feats).numpy(), np.array(dataset.pids), np.array(dataset.camids)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_b16_ms", choices=MODELS)
    parser.add_argument("--checkpoint", help="a local checkpoint for the backbone (see docs/loading.md)")
    parser.add_argument("--data", type=Path, default=SAMPLE_DATA, help="folder holding the query and gallery folders")
    parser.add_argument("--query-dir", default="query")
    parser.add_argument("--gallery-dir", default="gallery")
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=16, help="patch stride: 16 or 12 (overlapping)")
    parser.add_argument("--camera-num", type=int, default=0,
                        help="cameras of the camera embedding (SIE); the labels come from the file names")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--metric", choices=reid_ms.metrics.METRICS, default="cosine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a narrow, shallow model at 128x64 (fast, for CI)")
    args = parser.parse_args(argv)

    kwargs = dict(img_size=tuple(args.img_size), stride_size=args.stride, camera_num=args.camera_num)
    if args.tiny:
        kwargs.update(TINY[args.model.split("_")[0]], img_size=(128, 64))
    torch.manual_seed(0)
    model = reid_ms.build(args.model, pretrained=args.checkpoint, **kwargs)
    if model.load_report is not None:
        print(model.load_report)
    model.eval().to(args.device)
    print(f"model     {args.model}: {model.backbone.img_size[0]}x{model.backbone.img_size[1]}, "
          f"grid {model.grid_size[0]}x{model.grid_size[1]}, feature width {model.feat_dim}"
          f"{'' if args.checkpoint else ' (random weights)'}")

    sets = {}
    for what, sub in (("query", args.query_dir), ("gallery", args.gallery_dir)):
        feats, pids, cams = extract(model, args.data / sub, args.batch_size, args.device)
        keep = pids != JUNK_PID
        sets[what] = feats[keep], pids[keep], cams[keep]
        print(f"{what:<9} {len(pids)} images ({int((~keep).sum())} junk dropped) -> features {list(feats[keep].shape)}")

    (qf, q_pids, q_cams), (gf, g_pids, g_cams) = sets["query"], sets["gallery"]
    result = reid_ms.metrics.evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric=args.metric)
    print(f"queries   {result.num_valid_queries} of {len(qf)} have a match on another camera ({args.metric} distance)")
    for k in (1, 5, 10):
        print(f"Rank-{k:<4d}{100 * result.rank(k):6.2f}%")
    print(f"mAP      {100 * result.mAP:6.2f}%")


if __name__ == "__main__":
    main()
