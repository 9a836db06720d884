"""load_clip_weights: OpenAI / open_clip / CLIP-ReID checkpoints written by the tests, open_clip as oracle."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from _helpers_clip import (TINY, clip_reid_forward, clip_reid_resize, open_clip_model, open_clip_tokens,
                           randomise_norms_and_biases)
from reid_ms import CheckpointError, ClipVisual, ConfigError, load_clip_weights
from reid_ms.weights.clip import clip_checkpoint_filter

# open_clip_model(): image 32, patch 8 (grid 4x4), width 64, 2 layers (heads = width // 16 = 4), output 32.
SAME_GRID = dict(img_size=(32, 32), patch_size=8, stride_size=8, **TINY)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def oc_model():
    return open_clip_model()


@pytest.fixture(scope="module")
def clip_reid_ckpt(tmp_path_factory):
    """A CLIP-ReID-trained checkpoint at 64x32, stride 12 (grid 5x2), 3 cameras: ``(path, source model)``."""
    torch.manual_seed(1)
    source = ClipVisual(img_size=(64, 32), stride_size=12, camera_num=3, **TINY)
    randomise_norms_and_biases(source, seed=1)
    ckpt = {f"image_encoder.{k}": v for k, v in source.state_dict().items() if k != "cv_embed"}
    ckpt["cv_embed"] = source.cv_embed.detach().clone()
    for name, bn in (("bottleneck", nn.BatchNorm1d(64)), ("bottleneck_proj", nn.BatchNorm1d(32))):
        ckpt.update({f"{name}.{k}": v for k, v in bn.state_dict().items()})
    ckpt["classifier.weight"] = torch.randn(10, 64)
    ckpt["classifier_proj.weight"] = torch.randn(10, 32)
    ckpt["prompt_learner.cls_ctx"] = torch.randn(10, 4, 32)
    ckpt["prompt_learner.token_prefix"] = torch.randn(10, 1, 32)
    ckpt["prompt_learner.token_suffix"] = torch.randn(10, 11, 32)
    ckpt["text_encoder.positional_embedding"] = torch.randn(16, 32)
    ckpt["text_encoder.transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(96, 32)
    ckpt["text_encoder.ln_final.weight"] = torch.randn(32)
    ckpt["text_encoder.text_projection"] = torch.randn(32, 32)
    path = tmp_path_factory.mktemp("clipreid") / "ViT-B-16_60.pth"
    torch.save(ckpt, path)
    return path, source.eval()


def test_openai_layout_state_dict_matches_open_clip(oc_model, tmp_path):
    path = tmp_path / "openai_layout.pt"
    torch.save(oc_model.state_dict(), path)
    model = ClipVisual(**SAME_GRID).eval()
    report = load_clip_weights(model, path)
    assert report.kind == "openai" and not report.resized and not report.kept_init
    assert sorted(report.loaded) == sorted(model.state_dict())
    ignored = " ".join(report.ignored)
    assert all(k in ignored for k in ("token_embedding.weight", "text_projection", "logit_scale", "ln_final.bias"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, tokens = open_clip_tokens(oc_model.visual, x)
        torch.testing.assert_close(model(x)[:, 0], pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x, project=False), tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["wrapped_ddp", "module_prefix", "safetensors", "fp16", "bare_visual"])
def test_layouts_give_the_same_model(oc_model, tmp_path, layout):
    sd = {k: v.detach().clone() for k, v in oc_model.state_dict().items()}
    want_kind, want = "openai", sd
    if layout == "wrapped_ddp":
        obj = {"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
               "optimizer": {"state": {}, "param_groups": []}}
        want_kind = "open_clip"
    elif layout == "module_prefix":
        obj, want_kind = {f"module.{k}": v for k, v in sd.items()}, "open_clip"
    elif layout == "fp16":
        obj = want = {k: v.half() for k, v in sd.items()}
    elif layout == "bare_visual":
        obj, want_kind = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}, "clip-visual"
    else:
        obj = sd
    path = tmp_path / "ckpt"
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    model = ClipVisual(**SAME_GRID)
    report = load_clip_weights(model, path)
    assert report.kind == want_kind
    assert report.format == ("safetensors" if layout == "safetensors" else "torch.save")
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, want[f"visual.{k}"].float()), k
    if layout == "wrapped_ddp":
        assert any("optimizer" in s for s in report.ignored)


def test_square_openai_grid_resized_like_clip_reid(oc_model, tmp_path):
    path = tmp_path / "openai_layout.pt"
    torch.save(oc_model.state_dict(), path)
    model = ClipVisual(img_size=(64, 24), patch_size=8, stride_size=8, **TINY).eval()
    report = load_clip_weights(model, path)
    assert report.resized == {"positional_embedding": ((17, 64), (25, 64))}
    visual = {k[len("visual."):]: v.detach() for k, v in oc_model.state_dict().items() if k.startswith("visual.")}
    visual["positional_embedding"] = clip_reid_resize(visual["positional_embedding"], (4, 4), (8, 3))
    torch.testing.assert_close(model.positional_embedding.detach(), visual["positional_embedding"], atol=0, rtol=0)
    x = torch.randn(2, 3, 64, 24)
    with torch.no_grad():
        _, want = clip_reid_forward(visual, x, stride=8, heads=4)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_camera_table_kept_at_init_for_openai_weights(oc_model, tmp_path):
    path = tmp_path / "openai_layout.pt"
    torch.save(oc_model.state_dict(), path)
    model = ClipVisual(camera_num=2, view_num=3, **SAME_GRID)
    table = model.cv_embed.detach().clone()
    report = load_clip_weights(model, path)
    assert report.kept_init == ["cv_embed"] and "cv_embed" not in report.loaded
    assert torch.equal(model.cv_embed.detach(), table)
    assert torch.equal(model.class_embedding.detach(), oc_model.visual.class_embedding.detach())


def test_clip_reid_checkpoint(clip_reid_ckpt):
    path, source = clip_reid_ckpt
    model = ClipVisual(img_size=(64, 32), stride_size=12, camera_num=3, **TINY).eval()
    report = load_clip_weights(model, path)
    assert report.kind == "clip-reid" and not report.resized and not report.kept_init
    assert "cv_embed" in report.loaded
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    ignored = " ".join(report.ignored)
    for k in ("bottleneck.weight", "bottleneck.running_var", "bottleneck_proj.bias", "classifier.weight",
              "classifier_proj.weight", "prompt_learner.cls_ctx", "text_encoder.text_projection"):
        assert k in ignored
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, cam_label=[2, 1]), source(x, cam_label=[2, 1]), atol=0, rtol=0)


@pytest.mark.parametrize("build, message", [
    (dict(stride_size=16, camera_num=3), r"10 patch positions.*stride_size=12"),
    (dict(stride_size=12, camera_num=2), r"3 rows in the file but 2 in the model.*camera_num=3"),
    (dict(stride_size=12, camera_num=0), r"built without one.*camera_num=3"),
    (dict(stride_size=12, camera_num=1, view_num=2), r"camera_num=1, view_num=2.*camera_num=3"),
])
def test_clip_reid_mismatches_name_what_to_build(clip_reid_ckpt, build, message):
    path, _ = clip_reid_ckpt
    model = ClipVisual(img_size=(64, 32), **build, **TINY)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        load_clip_weights(model, path)
    assert _unchanged(model, before)


@pytest.mark.parametrize("trained_stride, built_stride, count", [(12, 16, 210), (16, 12, 128)])
def test_reid_grid_counts_at_256x128_name_the_stride(tmp_path, trained_stride, built_stride, count):
    small = dict(width=32, layers=1, heads=2, output_dim=16)
    trained = ClipVisual(img_size=(256, 128), stride_size=trained_stride, **small)
    path = tmp_path / "trained.pth"
    torch.save({f"image_encoder.{k}": v for k, v in trained.state_dict().items()}, path)
    model = ClipVisual(img_size=(256, 128), stride_size=built_stride, **small)
    with pytest.raises(CheckpointError, match=rf"{count} patch positions .*stride_size={trained_stride} "):
        load_clip_weights(model, path)


def test_vit_checkpoints_are_refused(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    model = ClipVisual(**SAME_GRID)
    before = _snapshot(model)
    for name, obj in (("imagenet.pth", vit.state_dict()),
                      ("transreid.pth", {f"base.{k}": v for k, v in vit.state_dict().items()}),
                      ("deit.pth", {"model": {f"module.{k}": v for k, v in vit.state_dict().items()}})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match="load_vit_weights"):
            load_clip_weights(model, tmp_path / name)
    assert _unchanged(model, before)


@pytest.mark.parametrize("build, message", [
    (dict(SAME_GRID, width=32, heads=4), r"width=64.*built with width=32"),
    (dict(SAME_GRID, layers=3), r"layers=2.*built with layers=3"),
    (dict(SAME_GRID, output_dim=16), r"output_dim=32.*built with output_dim=16"),
    (dict(SAME_GRID, patch_size=16, stride_size=16), r"patch_size=\(8, 8\).*patch_size=\(16, 16\)"),
])
def test_architecture_mismatch_names_the_arguments(oc_model, tmp_path, build, message):
    path = tmp_path / "openai_layout.pt"
    torch.save(oc_model.state_dict(), path)
    model = ClipVisual(**build)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=message):
        load_clip_weights(model, path)
    assert _unchanged(model, before)


def test_unknown_content_is_an_error_not_a_skip(oc_model, clip_reid_ckpt, tmp_path):
    model = ClipVisual(**SAME_GRID)
    before = _snapshot(model)
    torch.save({"encoder.weight": torch.randn(4, 4)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        load_clip_weights(model, tmp_path / "other.pth")
    sd = dict(oc_model.state_dict())
    sd["visual.extra_head.weight"] = torch.randn(3, 3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="extra_head"):
        load_clip_weights(model, tmp_path / "extra.pth")
    reid = torch.load(clip_reid_ckpt[0])
    reid["arcface.weight"] = torch.randn(3, 3)
    torch.save(reid, tmp_path / "reid_extra.pth")
    with pytest.raises(CheckpointError, match="arcface"):
        load_clip_weights(ClipVisual(img_size=(64, 32), stride_size=12, camera_num=3, **TINY),
                          tmp_path / "reid_extra.pth")
    sd = dict(oc_model.state_dict())
    sd["visual.proj"] = sd["visual.proj"].clone()
    sd["visual.proj"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="NaN"):
        load_clip_weights(model, tmp_path / "nan.pth")
    assert _unchanged(model, before)


def test_filter_is_pure_and_loader_wants_a_clip_model(oc_model):
    model = ClipVisual(camera_num=2, **SAME_GRID)
    before = _snapshot(model)
    state, report, heads = clip_checkpoint_filter(oc_model.state_dict(), model)
    assert set(state) == set(model.state_dict()) and report.kept_init == ["cv_embed"] and heads == {}
    assert _unchanged(model, before)
    with pytest.raises(ConfigError, match="ClipVisual"):
        load_clip_weights(nn.Linear(2, 2), "unused.pt")


@pytest.mark.full
def test_open_clip_vit_b16_quickgelu_full_size(tmp_path):
    import open_clip

    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    path = tmp_path / "vit_b16_open_clip.pt"
    torch.save(oc.state_dict(), path)
    model = ClipVisual(img_size=(224, 224)).eval()
    report = load_clip_weights(model, path)
    assert report.kind == "openai" and not report.resized
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled, tokens = open_clip_tokens(oc.visual, x)
        torch.testing.assert_close(model(x)[:, 0], pooled, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(x, project=False), tokens, atol=1e-4, rtol=0)
