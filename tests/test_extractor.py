"""FeatureExtractor: the model's own preprocessing (timm as the oracle), every input kind, camera policies,
frames plus boxes, the BoxMOT hook, and equality with ``reid-ms extract``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image

import reid_ms
from reid_ms.cli import main

SAMPLE = reid_ms.sample_data().root
QUERY = sorted((SAMPLE / "query").glob("*.jpg"))
TINY = dict(embed_dim=32, depth=1, num_heads=2, img_size=(48, 32))


def _tiny(name: str = "vit_b16", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = reid_ms.build(name, **{**(TINY if name.startswith("vit") else {}), **kw}).eval()
    with torch.no_grad():                                # BNNeck statistics start at 0 / 1: make them count
        model.head.bottleneck.running_mean.normal_()
        model.head.bottleneck.running_var.uniform_(0.5, 2.0)
    return model


def _timm_batch(model, images) -> torch.Tensor:
    """The images preprocessed by timm's transform for the config timm resolves from the model."""
    tf = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    return torch.stack([tf(img) for img in images])


def test_timm_resolves_the_models_config_and_its_transform_matches():
    model = _tiny(img_size=(64, 48))
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 64, 48)
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and tuple(cfg["std"]) == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bilinear"
    images = [Image.open(p).convert("RGB") for p in QUERY[:3]]
    fx = reid_ms.FeatureExtractor(model)
    x = _timm_batch(model, images)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(fx(images), expected, rtol=1e-5, atol=1e-5)


def test_every_input_kind_gives_the_same_embedding():
    model = _tiny()
    fx = reid_ms.FeatureExtractor(model, batch_size=2)
    pil = [Image.open(p).convert("RGB") for p in QUERY[:3]]
    rgb = [np.asarray(im) for im in pil]
    by_path = fx([str(p) for p in QUERY[:3]])
    assert by_path.shape == (3, model.feat_dim)
    torch.testing.assert_close(fx(pil), by_path, rtol=0, atol=0)
    torch.testing.assert_close(fx(rgb), by_path, rtol=0, atol=0)
    torch.testing.assert_close(fx([im[:, :, ::-1] for im in rgb], bgr=True), by_path, rtol=0, atol=0)
    torch.testing.assert_close(fx(np.stack(rgb)), by_path, rtol=0, atol=0)
    mixed = fx([QUERY[0], pil[1], rgb[2]])
    torch.testing.assert_close(mixed, by_path, rtol=0, atol=0)
    # a folder is its images sorted by name
    torch.testing.assert_close(fx(SAMPLE / "query"), fx(QUERY), rtol=0, atol=0)


def test_tensor_inputs_at_the_model_size():
    # at the model's own size no resize happens, so channel order and scaling are what is tested
    model = _tiny()
    fx = reid_ms.FeatureExtractor(model)
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (2, 3, 48, 32), dtype=torch.uint8, generator=g)
    arrays = [t.permute(1, 2, 0).numpy() for t in u8]
    expected = fx(arrays)
    torch.testing.assert_close(fx(u8), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fx([t.float() / 255 for t in u8]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fx(u8.flip(1), bgr=True), expected, rtol=1e-5, atol=1e-5)


def test_flip_averages_the_mirror():
    model = _tiny()
    images = [Image.open(p).convert("RGB") for p in QUERY[:2]]
    x = _timm_batch(model, images)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
    torch.testing.assert_close(reid_ms.FeatureExtractor(model, flip=True)(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,table", [("vit_b16", "sie_embed"), ("clip_b16", "cv_embed")])
def test_camera_policies(name, table):
    kw = {} if name.startswith("vit") else dict(width=32, layers=1, heads=2, output_dim=16, img_size=(48, 32))
    model = _tiny(name, camera_num=3, **kw)
    fx = reid_ms.FeatureExtractor(model)
    images = [Image.open(p).convert("RGB") for p in QUERY[:3]]
    x = _timm_batch(model, images)
    with pytest.raises(reid_ms.InputError, match="'mean'.*'none'"):
        fx(images)
    with pytest.raises(reid_ms.InputError, match="policy"):
        fx(images, cam_label="average")
    param = getattr(model.backbone, table)
    before = param.detach().clone()
    with torch.no_grad():
        torch.testing.assert_close(fx(images, cam_label=[2, 0, 1]), model(x, cam_label=torch.tensor([2, 0, 1])))
        torch.testing.assert_close(fx(images, cam_label=1), model(x, cam_label=1))
        mean_model = _tiny(name, camera_num=3, **kw)
        getattr(mean_model.backbone, table).copy_(before.mean(0, keepdim=True).expand_as(before))
        torch.testing.assert_close(fx(images, cam_label="mean"), mean_model(x, cam_label=2), rtol=1e-5, atol=1e-5)
        plain = _tiny(name, **kw)                                      # the same weights without a table
        state = {k: v for k, v in model.state_dict().items() if table not in k}
        plain.load_state_dict(state)
        torch.testing.assert_close(fx(images, cam_label="none"), plain(x), rtol=1e-5, atol=1e-5)
    # the table is back, same object, same values
    assert getattr(model.backbone, table) is param
    torch.testing.assert_close(param.detach(), before, rtol=0, atol=0)


def test_from_boxes_clips_normalises_and_refuses_degenerate_boxes():
    model = _tiny()
    fx = reid_ms.FeatureExtractor(model)
    frame = np.asarray(Image.open(QUERY[0]).convert("RGB").resize((200, 150)))[:, :, ::-1].copy()  # BGR
    boxes = np.array([[10, 20, 60, 140, 0.8], [-30, 100.5, 40.2, 400, 0.9]])      # a score column, ignored
    feats = fx.from_boxes(frame, boxes)
    assert feats.shape == (2, model.feat_dim)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2))
    # the second box is clipped to x 0..41 (40.2 rounded out), y 100..150
    crops = [frame[20:140, 10:60], frame[100:150, 0:41]]
    expected = F.normalize(fx(crops, bgr=True), dim=1)
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    assert fx.from_boxes(frame, np.zeros((0, 4))).shape == (0, model.feat_dim)
    for bad in ([5, 5, 5, 50], [50, 5, 10, 50], [300, 10, 400, 50], [0, 0, float("nan"), 10]):
        with pytest.raises(reid_ms.InputError, match="box 1"):
            fx.from_boxes(frame, [[0, 0, 10, 10], bad])
    with pytest.raises(reid_ms.InputError, match="x1, y1, x2, y2"):
        fx.from_boxes(frame, [1, 2, 3, 4])
    with pytest.raises(reid_ms.InputError, match="uint8"):
        fx.from_boxes(frame.astype(np.float32), boxes)


def test_boxmot_adapter():
    model = _tiny(camera_num=2)
    fx = reid_ms.FeatureExtractor(model)
    with pytest.raises(reid_ms.InputError, match="'mean'"):
        reid_ms.BoxMOTAdapter(fx)
    adapter = reid_ms.BoxMOTAdapter(fx, cam_label="mean")
    frame = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    xyxys = np.array([[0, 0, 30, 60], [20, 10, 80, 110]], dtype=np.float32)
    got = adapter.get_features(xyxys, frame)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (2, model.feat_dim)
    np.testing.assert_allclose(got, fx.from_boxes(frame, xyxys, cam_label="mean").numpy(), rtol=0, atol=0)


def test_equals_reid_ms_extract_on_arbitrary_file_names(tmp_path):
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, p in enumerate(QUERY):
        shutil.copy(p, folder / f"track{i:02d}-frame.jpg")             # no ids or cameras in the names
    out = tmp_path / "f.npz"
    args = ["extract", "vit_b16", "--set", "embed_dim=32", "--set", "depth=1", "--set", "num_heads=2",
            "--img-size", "48", "32", "--images", str(folder), "--out", str(out), "--seed", "3", "-q"]
    assert main(args) == 0
    with np.load(out) as data:
        feats, paths = data["feats"], list(data["paths"])
        assert "pids" not in data.files                               # nothing to parse: no ids written
    torch.manual_seed(3)
    fx = reid_ms.FeatureExtractor("vit_b16", device="cpu", **TINY)
    assert paths == sorted(p.name for p in folder.iterdir())
    np.testing.assert_allclose(fx(folder).numpy(), feats, rtol=1e-6, atol=1e-6)


def test_bad_arguments():
    model = _tiny()
    with pytest.raises(reid_ms.ConfigError, match="model name"):
        reid_ms.FeatureExtractor(model, weights="x.pth")
    with pytest.raises(reid_ms.ConfigError, match="unknown model"):
        reid_ms.FeatureExtractor("vit_b61")
    fx = reid_ms.FeatureExtractor(model)
    with pytest.raises(reid_ms.InputError, match="image 1"):
        fx([np.zeros((10, 10, 3), np.uint8), np.zeros((10, 10), np.uint8)])
    with pytest.raises(reid_ms.InputError, match="does not exist"):
        fx(["missing.jpg"])
    with pytest.raises(reid_ms.InputError, match="needs a model with a camera"):
        fx([np.zeros((10, 10, 3), np.uint8)], cam_label="mean")
