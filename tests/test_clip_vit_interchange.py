"""VitTrans and ClipVisual are interchangeable: one loop builds, loads and calls either with camera labels."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from _helpers_clip import open_clip_model
from reid_ms import ClipVisual, VitTrans, load_clip_weights, load_vit_weights


def _imagenet_vit(path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=0)
    torch.save(vit.state_dict(), path)
    return vit.state_dict()


def _openai_clip(path) -> dict[str, torch.Tensor]:
    sd = open_clip_model(image_size=32, patch_size=16).state_dict()
    torch.save(sd, path)
    return sd


# (backbone, its arguments, loader, checkpoint writer, (model key, file key) of a tensor loaded as stored)
BACKBONES = {
    "vit": (VitTrans, dict(embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.0), load_vit_weights,
            _imagenet_vit, ("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.weight")),
    "clip": (ClipVisual, dict(width=64, layers=2, heads=4, output_dim=32), load_clip_weights, _openai_clip,
             ("transformer.resblocks.1.attn.in_proj_weight", "visual.transformer.resblocks.1.attn.in_proj_weight")),
}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_same_loop_over_both_backbones(name, tmp_path):
    cls, kwargs, loader, write, (model_key, file_key) = BACKBONES[name]
    stored = write(tmp_path / "pretrained.pth")
    model = cls(img_size=(64, 32), patch_size=16, stride_size=12, camera_num=3, view_num=2, **kwargs).eval()
    report = loader(model, tmp_path / "pretrained.pth")
    assert len(report.kept_init) == 1  # the camera/view table: the file has none
    assert len(report.resized) == 1  # 2x2 square grid -> 5x2
    assert torch.equal(model.state_dict()[model_key], stored[file_key])
    assert model.grid_size == (5, 2) and model.num_patches == 10

    images = torch.randn(3, 3, 64, 32)
    cams, views = torch.tensor([0, 2, 1]), torch.tensor([1, 1, 0])
    with torch.no_grad():
        tokens = model(images, cam_label=cams, view_label=views)
        moved = model(images, cam_label=torch.tensor([1, 2, 1]), view_label=views)
    assert tokens.shape == (3, 1 + model.num_patches, model.out_dim)
    assert torch.isfinite(tokens).all()
    assert not torch.allclose(moved[0, 0], tokens[0, 0])  # the camera reaches the CLS token
    torch.testing.assert_close(moved[1:], tokens[1:], atol=0, rtol=0)
