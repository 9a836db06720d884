"""CLIP ViT-B/16 with the multi-scale neck, two ways: on the 512-wide projected tokens, or adapted to 768.

    python examples/clip_multiscale.py                              # random init, 256x128, stride 16
    python examples/clip_multiscale.py --checkpoint ViT-B-16.pt     # OpenAI's TorchScript file, read safely
    python examples/clip_multiscale.py --light --stride 12          # the light necks, overlapping patches
    python examples/clip_multiscale.py --tiny                       # a small CLIP, for CI

``clip_b16_ms`` runs the neck on CLIP's projected tokens (512 wide, CLIP-ReID's ``xproj``);
``clip_b16_adapt_ms`` first projects every token to 768 with a learned ``DimAdapter`` so the neck has
the width of the ViT-B neck. Both share the backbone: with the same weights their backbone tokens are
identical and only what follows differs. The table shows widths, parameter counts, the embedding shape
and the forward time of a batch.
"""

from __future__ import annotations

import argparse
import time

import torch

import reid_ms

TINY = dict(width=64, layers=2, heads=4, output_dim=32)
TINY_ADAPT_DIM = 48            # stands for 768 at the tiny size


def _params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="OpenAI's ViT-B-16.pt, an open_clip or a CLIP-ReID checkpoint")
    parser.add_argument("--light", action="store_true", help="the *_light models (depthwise windows + shared projection)")
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=16, help="patch stride: 16 or 12 (overlapping)")
    parser.add_argument("--camera-num", type=int, default=0, help="cameras of the camera embedding (on the CLS)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a narrow, shallow CLIP at 128x64 (fast, for CI)")
    args = parser.parse_args(argv)

    common = dict(img_size=tuple(args.img_size), stride_size=args.stride, camera_num=args.camera_num)
    if args.tiny:
        common.update(TINY, img_size=(128, 64))
    suffix = "_light" if args.light else ""
    names = (f"clip_b16_ms{suffix}", f"clip_b16_adapt_ms{suffix}")

    models = {}
    for name in names:
        kwargs = dict(common, adapt_dim=TINY_ADAPT_DIM) if args.tiny and "adapt" in name else common
        torch.manual_seed(0)                       # the backbone is built first: same seed, same backbone
        models[name] = reid_ms.build(name, pretrained=args.checkpoint, **kwargs).eval()
    if args.checkpoint:
        print(models[names[0]].load_report)

    img_h, img_w = models[names[0]].backbone.img_size
    images = torch.randn(args.batch, 3, img_h, img_w, generator=torch.Generator().manual_seed(1))
    cams = torch.arange(args.batch) % args.camera_num if args.camera_num else None
    rows = []
    backbone_tokens = []
    with torch.inference_mode():
        for name, model in models.items():
            backbone_tokens.append(model.backbone(images, cam_label=cams))
            tokens = model.forward_features(images, cam_label=cams)
            model(images, cam_label=cams)                      # warm-up
            start = time.perf_counter()
            emb = model(images, cam_label=cams)
            ms = 1000 * (time.perf_counter() - start)
            rows.append((name, model.backbone.width, model.backbone.out_dim, tokens.shape[-1],
                         _params(model.adapter), _params(model.neck), list(emb.shape), ms))

    grid = models[names[0]].grid_size
    print(f"CLIP ViT {img_h}x{img_w}, stride {args.stride}: grid {grid[0]}x{grid[1]}, batch {args.batch}, "
          f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}")
    header = ("model", "inside", "out", "neck width", "adapter params", "neck params", "embedding", "forward ms")
    widths = (max(len(n) for n in names) + 2, 8, 6, 12, 16, 13, 12, 10)
    print("".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for name, inside, out, neck_w, adapter_p, neck_p, shape, ms in rows:
        cells = (name, inside, out, neck_w, f"{adapter_p:,}", f"{neck_p:,}", str(shape), f"{ms:.1f}")
        print("".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
    same = torch.equal(backbone_tokens[0], backbone_tokens[1])
    print(f"backbone tokens of the two models identical: {same} "
          f"(shape {list(backbone_tokens[0].shape)}; the adapter and the neck make the difference)")


if __name__ == "__main__":
    main()
