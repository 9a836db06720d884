"""Every registered model at a tiny size: forward, gradients, determinism, pretrained loading."""

from __future__ import annotations

import pytest
import torch

from reid_ms import BNNeckHead, ConfigError, DimAdapter, MultiScaleSlidingWindow, ReIDModel, build, list_models
from reid_ms.registry import get_spec

# backbone -> neck -> BNNeck models; the JPM and multi-modal classes are tested in test_jpm.py / test_multimodal.py
PLAIN_MODELS = [name for name in list_models() if get_spec(name).model is None]


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_forward_backward_eval(name, tiny):
    model = tiny.build(name, num_classes=5, camera_num=3, view_num=2, wake=True)
    spec = get_spec(name)
    width = tiny.width(name)
    assert model.feat_dim == width and model.head.feat_dim == width
    assert (model.neck is None) == (spec.neck_mode is None)
    assert (model.adapter is None) == (spec.adapt_dim is None)
    x, cams, views = tiny.images(), torch.tensor([0, 2, 1]), torch.tensor([1, 0, 1])

    model.train()
    logits, feature = model(x, cam_label=cams, view_label=views)
    assert logits.shape == (3, 5) and feature.shape == (3, width)
    gen = torch.Generator().manual_seed(1)
    # random projections: a plain sum of a LayerNorm / BatchNorm output has no gradient
    loss = (logits * torch.randn(3, 5, generator=gen)).sum() + (feature * torch.randn(3, width, generator=gen)).sum()
    loss.backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.any(), pname

    model.eval()
    emb = model(x, cam_label=cams, view_label=views)
    assert emb.shape == (3, width) and torch.isfinite(emb).all()
    assert torch.equal(emb, model(x, cam_label=cams, view_label=views))
    tokens = model.forward_features(x, cam_label=cams, view_label=views)
    assert tokens.shape == (3, 1 + 5 * 2, width)
    assert torch.equal(model.forward_head(tokens), emb) and torch.equal(model.forward_head(tokens, pre_logits=True), emb)
    torch.testing.assert_close(tokens[:, 0], emb)  # neck_feat="before": the enhanced CLS itself
    backbone_tokens = model.backbone(x, cam_label=cams, view_label=views)
    if model.adapter is not None:
        backbone_tokens = model.adapter(backbone_tokens)
    torch.testing.assert_close(tokens[:, 1:], backbone_tokens[:, 1:])  # the neck changes the CLS only


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_pretrained_backbone(name, tmp_path, tiny):
    args = tiny.args(name, camera_num=3)
    torch.manual_seed(1)
    source = build(name, **args).backbone
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # nothing equal to a fresh initialisation by chance
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)

    torch.manual_seed(2)
    model = build(name, pretrained=str(path), **args)
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert set(model.load_report.loaded) == {f"backbone.{k}" for k in source.state_dict()}
    x = tiny.images(2)
    model.eval()
    source.eval()
    if model.neck is None and model.adapter is None:
        torch.testing.assert_close(model(x, cam_label=[0, 1]), source(x, cam_label=[0, 1])[:, 0])
    assert build(name, **args).load_report is None


def test_fresh_neck_keeps_the_backbone_embedding(tiny):
    plain = tiny.build("vit_b16", seed=3).eval()
    for name in ("vit_b16_ms", "vit_b16_ms_light"):
        with_neck = tiny.build(name).eval()
        with_neck.backbone.load_state_dict(plain.backbone.state_dict())
        assert torch.equal(with_neck(tiny.images()), plain(tiny.images()))


def _trained_head(prefix: str, width: int, classes: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.weight": torch.rand(width, generator=gen) + 0.5,
        f"{prefix}.bias": torch.zeros(width),
        f"{prefix}.running_mean": torch.randn(width, generator=gen),
        f"{prefix}.running_var": torch.rand(width, generator=gen) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(1000),
        f"{prefix.replace('bottleneck', 'classifier')}.weight": torch.randn(classes, width, generator=gen),
    }


@pytest.mark.parametrize("name, wrap, head_prefix, width", [
    ("vit_b16_ms", "base.", "bottleneck", 32),     # TransReID: backbone under base.
    ("clip_b16", "image_encoder.", "bottleneck_proj", 24),  # CLIP-ReID: BNNeck of the projected feature
])
def test_pretrained_reid_checkpoint_fills_the_head(name, wrap, head_prefix, width, tmp_path, tiny):
    args = tiny.args(name, num_classes=7, neck_feat="after")
    torch.manual_seed(4)
    backbone = build(name, **args).backbone
    gen = torch.Generator().manual_seed(4)
    head = _trained_head(head_prefix, width, 7, gen)
    state = {wrap + k: v for k, v in backbone.state_dict().items()} | head
    if wrap == "image_encoder.":  # CLIP-ReID also holds a BNNeck of the unprojected feature: not ours
        state |= {"bottleneck.weight": torch.ones(32), "bottleneck.bias": torch.zeros(32)}
    path = tmp_path / "trained.pth"
    torch.save({"model": state} if wrap == "base." else state, path)

    model = build(name, pretrained=str(path), **args).eval()
    report = model.load_report
    assert {"head.bottleneck.weight", "head.bottleneck.running_var", "head.classifier.weight"} <= set(report.loaded)
    assert not any(entry.startswith(head_prefix + ".") for entry in report.ignored)
    assert torch.equal(model.head.classifier.weight, head[f"{head_prefix.replace('bottleneck', 'classifier')}.weight"])
    x = tiny.images(2)
    cls = backbone.eval()(x)[:, 0]
    expected = ((cls - head[f"{head_prefix}.running_mean"]) / torch.sqrt(head[f"{head_prefix}.running_var"] + 1e-5)
                * head[f"{head_prefix}.weight"])
    torch.testing.assert_close(model(x), expected)

    other = build(name, pretrained=str(path), **tiny.args(name, num_classes=3))  # another class count
    assert "head.classifier.weight" not in other.load_report.loaded
    assert any(entry.startswith(head_prefix.replace("bottleneck", "classifier")) for entry in other.load_report.ignored)
    assert torch.equal(other.head.bottleneck.running_mean, head[f"{head_prefix}.running_mean"])


def test_assembly_checks_widths(tiny):
    backbone = tiny.backbone("vit")
    with pytest.raises(ConfigError, match="feat_dim=32"):
        ReIDModel(backbone, neck=MultiScaleSlidingWindow(16))
    with pytest.raises(ConfigError, match="in_dim=32"):
        ReIDModel(backbone, adapter=DimAdapter(16, 48))
    with pytest.raises(ConfigError, match="feat_dim=48"):
        ReIDModel(backbone, adapter=DimAdapter(32, 48), head=BNNeckHead(32))
    model = ReIDModel(backbone, adapter=DimAdapter(32, 48), neck=MultiScaleSlidingWindow(48, (2,)))
    assert model.feat_dim == 48 and model.head.num_classes == 0
    assert model.eval()(tiny.images(2)).shape == (2, 48)


@pytest.mark.full
def test_full_size_widths_and_neck_parameters():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # one block each: the widths are the point here, not the depth
    vit = build("vit_b16_ms", stride_size=12, depth=1)
    clip = build("clip_b16_ms", layers=1)
    adapt = build("clip_b16_adapt_ms_light", layers=1)
    assert vit.backbone.grid_size == (21, 10) and vit.feat_dim == 768
    assert count(vit.neck) == 768 * 768 * (16 + 64 + 256) + 3 * 768
    assert clip.feat_dim == 512 and count(clip.neck) == 512 * 512 * (16 + 64 + 256) + 3 * 512
    assert adapt.feat_dim == 768 and count(adapt.adapter) == 512 * 768 + 768
    assert count(adapt.neck) == 768 * (16 + 64 + 256) + 3 * 768 + 768 * 768 + 768


@pytest.mark.parametrize("name", ["vit_b16_ms", "clip_b16_adapt_ms", "vit_b16_ms_jpm", "clip_b16_ms_rgbnt"])
def test_classifier_api_like_timm(name, tiny):
    model = tiny.build(name, num_classes=5)
    assert model.num_features == model.feat_dim == model.head.feat_dim and model.num_classes == 5
    classifier = model.get_classifier()
    layers = list(classifier) if isinstance(classifier, torch.nn.ModuleList) else [classifier]
    assert all(layer.out_features == 5 for layer in layers)
    model.reset_classifier(7)
    layers = model.get_classifier()
    layers = list(layers) if isinstance(layers, torch.nn.ModuleList) else [layers]
    assert model.num_classes == 7 and all(layer.out_features == 7 and layer.bias is None for layer in layers)
    # the new classifier is what the forward uses
    model.train()
    inputs = model.example_inputs(batch=2, generator=torch.Generator().manual_seed(0))
    args, kwargs = model.call_args(inputs)
    logits, _ = model(*args, **kwargs)
    for branch in (logits if isinstance(logits, tuple) else (logits,)):
        assert branch.shape == (2, 7)
    model.reset_classifier(0)
    assert model.get_classifier() is None and model(*args, **kwargs)[0] is None
    with pytest.raises(ConfigError, match="num_classes must be an int >= 0"):
        model.reset_classifier(-1)


@pytest.mark.parametrize("name", ["vit_b16_ms", "clip_b16_ms"])
def test_backbone_switches_on_the_built_model(name, tiny):
    model = tiny.build(name, camera_num=3).eval()
    model.set_fused_inference(False)                    # the README's call on a built model
    x = tiny.images(2)
    emb = model(x, cam_label=[0, 1])
    model.set_fused_inference(True)
    torch.testing.assert_close(model(x, cam_label=[0, 1]), emb, atol=1e-5, rtol=1e-5)
    calls = []
    for switch in ("set_fused_inference", "set_grad_checkpointing"):
        setattr(model.backbone, switch, lambda enable, switch=switch: calls.append((switch, enable)))
    model.set_fused_inference(False)
    model.set_grad_checkpointing()
    model.set_grad_checkpointing(False)
    assert calls == [("set_fused_inference", False), ("set_grad_checkpointing", True),
                     ("set_grad_checkpointing", False)]


def test_switch_missing_on_the_backbone_is_a_config_error(tiny):
    class Bare(torch.nn.Module):
        grid_size, out_dim = (2, 2), 8

        def forward(self, images, cam_label=None, view_label=None):
            return torch.zeros(images.shape[0], 5, 8)

    model = ReIDModel(Bare())
    with pytest.raises(ConfigError, match="Bare has no set_fused_inference"):
        model.set_fused_inference(False)
    assert model.eval()(torch.zeros(2, 3, 4, 4)).shape == (2, 8)


@pytest.mark.parametrize("name, expected", [
    ("vit_b16", ["images"]),
    ("clip_b16_adapt_ms", ["images", "cam_label", "view_label"]),
    ("vit_b16_ms_rgbnt", ["rgb", "nir", "tir", "cam_label"]),
])
def test_models_describe_their_inputs(name, expected, tiny):
    labels = {"cam_label": 3, "view_label": 2}
    tables = {{"cam_label": "camera_num", "view_label": "view_num"}[k]: labels[k] for k in expected if k in labels}
    model = tiny.build(name, **tables).eval()
    assert model.input_names() == expected
    inputs = model.example_inputs(batch=4, generator=torch.Generator().manual_seed(0))
    assert list(inputs) == expected
    for key in expected:
        if key in labels:
            assert inputs[key].dtype == torch.int64 and 0 <= int(inputs[key].min()) <= int(inputs[key].max()) < labels[key]
        else:
            assert inputs[key].shape == (4, 3, *tiny.IMG)
    args, kwargs = model.call_args(inputs)
    assert list(kwargs) == [k for k in expected if k in labels]
    assert model(*args, **kwargs).shape == (4, model.feat_dim)
