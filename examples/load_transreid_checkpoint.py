"""Load a checkpoint trained by TransReID into a reid_ms model and extract features with camera labels.

    python examples/load_transreid_checkpoint.py --checkpoint transformer_120.pth --stride 12 --camera-num 6
    python examples/load_transreid_checkpoint.py --checkpoint transformer_120.pth --model vit_b16_ms ...
    python examples/load_transreid_checkpoint.py            # writes and loads a random stand-in checkpoint
    python examples/load_transreid_checkpoint.py --tiny     # the same at a tiny size, for CI

TransReID saves ``model.state_dict()`` of its ``build_transformer``: the ViT under ``base.`` (with the
camera/view table ``base.sie_embed`` when trained with SIE, and an unused ``base.fc``), the BNNeck as
``bottleneck.*`` and the classifier as ``classifier.weight``. Build the model with the settings of the
training config (``INPUT.SIZE_TEST``, ``MODEL.STRIDE_SIZE``, the dataset's camera count when
``MODEL.SIE_CAMERA`` was on, the number of training identities); a mismatch raises an error naming the
argument to change. Features are taken before the BNNeck (``TEST.NECK_FEAT: before``) unless
``--neck-feat after``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import reid_ms
from reid_ms.data import ReidImageFolder, eval_transform

SAMPLE_QUERY = reid_ms.sample_data().query
TINY = dict(embed_dim=64, depth=2, num_heads=4)
TRANSREID_FC_CLASSES = 1000   # the ViT's own classifier TransReID builds and never uses


def write_stand_in(path: Path, img_size: tuple[int, int], stride: int, camera_num: int, view_num: int,
                   num_classes: int, vit_args: dict) -> None:
    """Save a randomly initialised model in TransReID's checkpoint layout (what its training loop writes)."""
    vit = reid_ms.VitTrans(img_size=img_size, stride_size=stride, camera_num=camera_num, view_num=view_num,
                           **vit_args)
    dim = vit.embed_dim
    state = {f"base.{k}": v for k, v in vit.state_dict().items()}
    state["base.fc.weight"] = torch.randn(TRANSREID_FC_CLASSES, dim) * 0.02
    state["base.fc.bias"] = torch.zeros(TRANSREID_FC_CLASSES)
    bottleneck = nn.BatchNorm1d(dim)
    bottleneck.running_mean.normal_(0, 0.1)       # as if trained: the statistics are not the defaults
    bottleneck.running_var.uniform_(0.5, 2.0)
    state.update({f"bottleneck.{k}": v for k, v in bottleneck.state_dict().items()})
    state["classifier.weight"] = torch.randn(num_classes, dim) * 0.001
    torch.save(state, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a TransReID-trained .pth; without it a stand-in is written")
    parser.add_argument("--model", default="vit_b16", choices=("vit_b16", "vit_b16_ms", "vit_b16_ms_light"))
    parser.add_argument("--img-size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=12, help="MODEL.STRIDE_SIZE of the training config")
    parser.add_argument("--camera-num", type=int, default=6, help="cameras of the dataset if trained with SIE "
                        "(Market-1501: 6, DukeMTMC: 8, MSMT17: 15); 0 if trained without")
    parser.add_argument("--view-num", type=int, default=0, help="views if trained with MODEL.SIE_VIEW (VeRi: 8)")
    parser.add_argument("--num-classes", type=int, default=751, help="training identities (Market-1501: 751)")
    parser.add_argument("--neck-feat", choices=("before", "after"), default="before")
    parser.add_argument("--images", type=Path, default=SAMPLE_QUERY, help="Market-1501-named images to embed")
    parser.add_argument("--tiny", action="store_true", help="a narrow, shallow ViT at 128x64 (fast, for CI)")
    args = parser.parse_args(argv)

    img_size = (128, 64) if args.tiny else tuple(args.img_size)
    vit_args = TINY if args.tiny else {}
    build_args = dict(img_size=img_size, stride_size=args.stride, camera_num=args.camera_num,
                      view_num=args.view_num, num_classes=args.num_classes, neck_feat=args.neck_feat, **vit_args)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint
        if path is None:
            path = Path(tmp) / "transreid_stand_in.pth"
            torch.manual_seed(0)
            write_stand_in(path, img_size, args.stride, args.camera_num, args.view_num, args.num_classes, vit_args)
            table = ", base.sie_embed" if args.camera_num or args.view_num else ""
            print(f"no --checkpoint given: wrote a STAND-IN checkpoint in TransReID's layout to {path.name}\n"
                  f"  (random weights under base.*{table}, bottleneck.*, classifier.weight; it shows the\n"
                  f"  loading, its features mean nothing; pass --checkpoint for a trained model)")
            if args.camera_num > 0:
                try:
                    reid_ms.build(args.model, pretrained=str(path), **{**build_args, "camera_num": 0})
                except reid_ms.CheckpointError as exc:
                    print(f"built with camera_num=0 instead, the load refuses:\n  CheckpointError: {exc}")

        model = reid_ms.build(args.model, pretrained=str(path), **build_args).eval()
        print("load report:")
        print("  " + str(model.load_report).replace("\n", "\n  "))
        head = [k for k in model.state_dict() if k.startswith("head.") and k in model.load_report.loaded]
        print(f"trained head: {', '.join(head) if head else 'none (the head keeps its initialisation)'}")

    dataset = ReidImageFolder(args.images, eval_transform(img_size))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    cams = torch.tensor(dataset.camids)
    if args.camera_num == 0:
        cams = None
    views = torch.zeros(len(dataset), dtype=torch.long) if args.view_num > 0 else None  # crops carry no view
    with torch.inference_mode():
        feats = model(images, cam_label=cams, view_label=views)
    cameras = "" if cams is None else f" with their cameras {sorted(set(dataset.camids))}"
    print(f"features {list(feats.shape)} ({args.neck_feat} the BNNeck) of the {len(dataset)} images in "
          f"{args.images}{cameras}")
    sim = torch.nn.functional.normalize(feats, dim=1)
    print(f"cosine similarity of the first two: {float(sim[0] @ sim[1]):.4f}")


if __name__ == "__main__":
    main()
