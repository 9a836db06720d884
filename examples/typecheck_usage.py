"""The documented calls, as a user's script writes them: CI type-checks this file with mypy and runs it.

    python examples/typecheck_usage.py      # tiny models, checkpoints written to a temporary folder
    mypy                                    # the [tool.mypy] files of pyproject.toml: src/ and this file

Everything here is what README.md and docs/ show, with tiny sizes so it runs in seconds; if a change to
reid_ms's annotations makes one of these calls a type error, users' own scripts break the same way.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

import reid_ms
from reid_ms import testing as rt
from reid_ms.metrics import EvalResult, evaluate

TINY_VIT: dict[str, Any] = dict(embed_dim=32, depth=2, num_heads=4)
TINY_CLIP: dict[str, Any] = dict(width=32, layers=2, heads=4, output_dim=16)


@reid_ms.register("vit_tiny_ms_light")
def vit_tiny_ms_light() -> reid_ms.ModelSpec:
    return reid_ms.ModelSpec(reid_ms.VitTrans, reid_ms.load_vit_weights, dict(TINY_VIT, img_size=(64, 32)),
                             neck_mode="light")


def backbones(tmp: Path) -> None:
    vit = reid_ms.VitTrans(img_size=(64, 32), stride_size=12, camera_num=6, **TINY_VIT)
    clip = reid_ms.ClipVisual(img_size=(64, 32), stride_size=12, camera_num=6, **TINY_CLIP)
    torch.save(vit.state_dict(), tmp / "vit.pth")
    torch.save(clip.state_dict(), tmp / "clip.pt")
    vit_report: reid_ms.LoadReport = reid_ms.load_vit_weights(vit, tmp / "vit.pth")
    clip_report: reid_ms.LoadReport = reid_ms.load_clip_weights(clip, str(tmp / "clip.pt"))
    print(f"loaded {len(vit_report.loaded)} ViT and {len(clip_report.loaded)} CLIP tensors")

    images, cams = torch.randn(2, 3, 64, 32), torch.randint(0, 6, (2,))
    tokens: torch.Tensor = vit(images, cam_label=cams)
    h, w = vit.grid_size
    assert tokens.shape == (2, 1 + h * w, vit.out_dim)
    assert clip(images, cam_label=cams, project=False).shape[-1] == 32

    neck = reid_ms.MultiScaleSlidingWindow(feat_dim=16, scales=(2, 4))
    adapter = reid_ms.DimAdapter(in_dim=16, out_dim=24)
    clip_tokens = clip(images, cam_label=cams)
    assert neck(clip_tokens, grid_size=clip.grid_size).shape == clip_tokens.shape
    assert adapter(clip_tokens).shape[-1] == 24


def models(tmp: Path) -> None:
    model = reid_ms.build("vit_b16_ms", img_size=(64, 32), stride_size=12, camera_num=6, num_classes=10,
                          scales=(2, 4), **TINY_VIT)
    # the backbone of a built model goes to the loader of its family
    report = reid_ms.load_vit_weights(model.backbone, tmp / "vit.pth")
    assert not report.resized or report.loaded
    model.eval()
    images, cams = torch.randn(4, 3, 64, 32), torch.tensor([0, 1, 2, 3])
    embedding: torch.Tensor = model(images, cam_label=cams)
    assert embedding.shape == (4, model.feat_dim)

    built = reid_ms.build("vit_tiny_ms_light", pretrained=tmp / "vit_plain.pth")
    assert built.load_report is not None and built.model_name == "vit_tiny_ms_light"
    print("registered models:", len(reid_ms.list_models()))


def metrics() -> None:
    qf, gf = torch.randn(3, 8), torch.randn(10, 8)
    q_pids, g_pids = torch.tensor([1, 2, 3]), torch.arange(10) % 4
    q_cams, g_cams = torch.zeros(3, dtype=torch.long), torch.ones(10, dtype=torch.long)
    result: EvalResult = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine")
    rank1: float = float(result.cmc[0])
    print(f"rank-1 {rank1:.2f}, mAP {result.mAP:.2f}, mINP {result.mINP:.2f}, "
          f"{result.num_valid_queries} valid queries")


def sample_set() -> None:
    folders = reid_ms.sample_data()
    queries: list[Path] = sorted(folders.query.glob("*.jpg"))
    assert len(queries) == 7 and folders.gallery.is_dir()


def contract() -> None:
    grid: tuple[int, int] = rt.grid_size((256, 128), 16, 12)
    assert grid == (21, 10)
    rt.check_backbone(reid_ms.VitTrans(img_size=(32, 32), embed_dim=8, depth=1, num_heads=2, camera_num=2))
    rt.check_neck(reid_ms.MultiScaleSlidingWindow(8, (2, 4), mode="light"))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.save(reid_ms.VitTrans(img_size=(64, 32), **TINY_VIT).state_dict(), folder / "vit_plain.pth")
        backbones(folder)
        models(folder)
    metrics()
    sample_set()
    contract()
    print("every documented call ran")


if __name__ == "__main__":
    main()
