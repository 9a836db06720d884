"""Multi-modal models: a shared backbone and neck over rgb / nir / tir, concatenation fusion, missing inputs."""

from __future__ import annotations

import pytest
import torch

import reid_ms
from reid_ms import ClipVisual, InputError, MultiModalReIDModel, VitTrans, build

NAMES = ["vit_b16_ms_rgbnt", "clip_b16_ms_rgbnt"]


def tiny_mm(tiny, name: str, **extra) -> MultiModalReIDModel:
    """Tiny, with a camera table, the neck woken (it starts at zero, see MultiScaleSlidingWindow)."""
    return tiny.build(name, camera_num=3, wake=True, **extra)


def inputs(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, 3, 64, 32, generator=gen) for m in ("rgb", "nir", "tir")}


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_on_three_modalities(name, tiny):
    model = tiny_mm(tiny, name, num_classes=5).train()
    d = tiny.width(name)
    assert model.feat_dim == model.head.feat_dim == 3 * d and model.modalities == ("rgb", "nir", "tir")
    logits, feature = model(inputs(), cam_label=torch.tensor([0, 2, 1]))
    assert logits.shape == (3, 5) and feature.shape == (3, 3 * d)
    gen = torch.Generator().manual_seed(2)
    loss = (logits * torch.randn(3, 5, generator=gen)).sum() + (feature * torch.randn(3, 3 * d, generator=gen)).sum()
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), pname


@pytest.mark.parametrize("name", NAMES)
def test_fused_feature_is_the_per_modality_runs_in_order(name, tiny):
    model = tiny_mm(tiny, name).eval()
    d, x, cams = tiny.width(name), inputs(), torch.tensor([1, 0, 2])
    with torch.no_grad():
        fused = model(x, cam_label=cams)
        assert fused.shape == (3, 3 * d)
        for i, m in enumerate(("rgb", "nir", "tir")):
            # one backbone run per modality, written out: CLS + the neck's context of that modality's grid
            tokens = model.backbone(x[m], cam_label=cams)
            alone = tokens[:, 0] + model.neck.context(tokens, model.grid_size)
            torch.testing.assert_close(fused[:, i * d:(i + 1) * d], alone, rtol=1e-5, atol=1e-5)
        # the camera label reaches every modality's run
        other = model(x, cam_label=torch.tensor([2, 1, 0]))
        for i in range(3):
            assert not torch.allclose(other[:, i * d:(i + 1) * d], fused[:, i * d:(i + 1) * d])
        assert torch.equal(model(x, cam_label=cams.tolist()), fused)
        # forward_features: each modality's tokens after the neck, the head's feature their CLS side by side
        tokens = model.forward_features(x, cam_label=cams)
        assert list(tokens) == ["rgb", "nir", "tir"] and tokens["tir"].shape == (3, 1 + 5 * 2, d)
        assert torch.equal(model.forward_head(tokens, pre_logits=True), fused)


@pytest.mark.parametrize("name", NAMES)
def test_missing_modality(name, tiny):
    strict = tiny_mm(tiny, name).eval()
    x, cams = inputs(), [0, 1, 2]
    partial = {m: x[m] for m in ("rgb", "nir")}
    with pytest.raises(InputError, match=r"\['tir'\] missing.*missing='zeros'"):
        strict(partial, cam_label=cams)
    zeros = tiny_mm(tiny, name, missing="zeros").eval()
    d = tiny.width(name)
    with torch.no_grad():
        full = zeros(x, cam_label=cams)
        torch.testing.assert_close(full, strict(x, cam_label=cams), rtol=0, atol=0)
        got = zeros(partial, cam_label=cams)
        assert got.shape == (3, 3 * d) and not got[:, 2 * d:].any()
        torch.testing.assert_close(got[:, :2 * d], full[:, :2 * d], rtol=1e-5, atol=1e-5)
        only_nir = zeros({"nir": x["nir"]}, cam_label=cams)
        assert not only_nir[:, :d].any() and not only_nir[:, 2 * d:].any()
        torch.testing.assert_close(only_nir[:, d:2 * d], full[:, d:2 * d], rtol=1e-5, atol=1e-5)


def test_inputs_that_are_refused(tiny):
    model = tiny_mm(tiny, "vit_b16_ms_rgbnt").eval()
    x = inputs()
    cases = [
        (x["rgb"], "dict of image batches"),
        ({**x, "RGB": x["rgb"]}, r"\['RGB'\] it was not built for"),
        ({}, "got no images"),
        ({**x, "tir": x["tir"][:2]}, "same batch size"),
        ({**x, "nir": x["nir"][0]}, r"inputs\['nir'\] must be images"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            model(bad, cam_label=[0, 1, 2])
    with pytest.raises(InputError, match=r"one label per image \(3\), got 2"):
        model(x, cam_label=[0, 1])
    with pytest.raises(InputError, match="cam_label must lie in"):
        model(x, cam_label=[0, 1, 3])
    with pytest.raises(reid_ms.ConfigError, match="missing must be one of"):
        tiny.build("vit_b16_ms_rgbnt", missing="drop")
    with pytest.raises(reid_ms.ConfigError, match="distinct"):
        tiny.build("vit_b16_ms_rgbnt", modalities=("rgb", "rgb"))


def test_two_modalities_by_name(tiny):
    model = tiny.build("clip_b16_ms_rgbnt", modalities=("rgb", "tir")).eval()
    x = inputs()
    assert model.feat_dim == 2 * 24
    with torch.no_grad():
        assert model({"rgb": x["rgb"], "tir": x["tir"]}).shape == (3, 48)


@pytest.mark.parametrize("name, backbone", [("vit_b16_ms_rgbnt", VitTrans), ("clip_b16_ms_rgbnt", ClipVisual)])
def test_pretrained_backbone(name, backbone, tmp_path, tiny):
    torch.manual_seed(3)
    source = backbone(**tiny.BACKBONES[backbone.__name__])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    model = build(name, pretrained=str(path), **tiny.args(name))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert set(model.load_report.loaded) == {f"backbone.{k}" for k in source.state_dict()}


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_with_a_dynamic_batch(name, tiny):
    model = tiny_mm(tiny, name, num_classes=5).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.rand_like(p))  # away from the identity BNNeck, so the head shows in the graph
    model.head.neck_feat = "after"
    batch = torch.export.Dim("batch", min=1)
    example = inputs(2)
    program = torch.export.export(model, (example,), {"cam_label": torch.tensor([0, 1])},
                                  dynamic_shapes={"inputs": {m: {0: batch} for m in example}, "cam_label": {0: batch}})
    x, cams = inputs(5, seed=4), torch.arange(5) % 3
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, cam_label=cams), model(x, cam_label=cams), rtol=0, atol=1e-5)
