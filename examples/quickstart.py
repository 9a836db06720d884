"""Build a re-ID backbone at 256x128, optionally load your checkpoint, and look at what it returns.

    python examples/quickstart.py                                   # ViT-B/16 (TransReID), random init
    python examples/quickstart.py --backbone clip --stride 12       # CLIP ViT-B/16 visual encoder
    python examples/quickstart.py --checkpoint jx_vit_base_p16_224-80ecf9dd.pth
    python examples/quickstart.py --checkpoint ViT-B-16.pt --backbone clip
    python examples/quickstart.py --tiny                            # a small model, for a quick look

Prints the token shapes, the patch grid, the parameter count and the forward speed in images/s.
"""

from __future__ import annotations

import argparse
import time

import torch

import reid_ms

TINY_VIT = dict(embed_dim=64, depth=2, num_heads=4)
TINY_CLIP = dict(width=64, layers=2, heads=4, output_dim=32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=("vit", "clip"), default="vit")
    parser.add_argument("--checkpoint", help="a local checkpoint (ImageNet/TransReID for vit, CLIP for clip)")
    parser.add_argument("--stride", type=int, default=16, help="patch stride: 16 or 12 (overlapping)")
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--camera-num", type=int, default=0, help="cameras for the camera embedding (SIE)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed forward passes")
    parser.add_argument("--tiny", action="store_true", help="a narrow, shallow model (fast, for CI)")
    args = parser.parse_args(argv)

    kwargs = dict(img_size=tuple(args.img_size), stride_size=args.stride, camera_num=args.camera_num)
    if args.backbone == "vit":
        model = reid_ms.VitTrans(**kwargs, **(TINY_VIT if args.tiny else {}))
        loader = reid_ms.load_vit_weights
    else:
        model = reid_ms.ClipVisual(**kwargs, **(TINY_CLIP if args.tiny else {}))
        loader = reid_ms.load_clip_weights
    if args.checkpoint:
        print(loader(model, args.checkpoint))
    model.eval()

    images = torch.randn(args.batch, 3, *args.img_size)
    cams = torch.arange(args.batch) % args.camera_num if args.camera_num else None
    with torch.inference_mode():
        tokens = model(images, cam_label=cams)
        start = time.perf_counter()
        for _ in range(args.iters):
            model(images, cam_label=cams)
        seconds = (time.perf_counter() - start) / args.iters

    params = sum(p.numel() for p in model.parameters())
    print(f"backbone      {type(model).__name__} (stride {args.stride}, {args.img_size[0]}x{args.img_size[1]})")
    print(f"grid          {model.grid_size[0]} x {model.grid_size[1]} = {model.num_patches} patches")
    print(f"tokens        {list(tokens.shape)}  (CLS first, then the patches row by row)")
    print(f"CLS feature   {list(tokens[:, 0].shape)}")
    print(f"parameters    {params / 1e6:.2f} M")
    print(f"speed         {args.batch / seconds:.1f} images/s (batch {args.batch}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
