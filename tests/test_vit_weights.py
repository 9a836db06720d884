"""load_vit_weights: every checkpoint layout written here, timm as the oracle, errors that leave the model as it was."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import _load_weights

import reid_ms
from reid_ms import CheckpointError, CheckpointNotFoundError, VitTrans, load_vit_weights
from reid_ms.weights.vit import vit_checkpoint_filter
from _helpers_vit import bilinear_grid, google_npz, timm_vit, transreid_forward


def vit(img_size=(64, 32), stride=16, embed_dim=32, depth=2, num_heads=4, seed=1, **kw) -> VitTrans:
    torch.manual_seed(seed)
    return VitTrans(img_size=img_size, stride_size=stride, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                    drop_path_rate=0.0, **kw).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, expected: dict[str, torch.Tensor], skip=()):
    got = model.state_dict()
    for k, v in expected.items():
        if k not in skip:
            assert torch.equal(got[k], v.to(got[k].dtype)), k


IMAGES = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))


# -- ImageNet layouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict"])
def test_timm_layouts_match_timm_at_the_resized_grid(tmp_path, wrap):
    ref = timm_vit(img_size=(64, 64))
    state = ref.state_dict()
    obj = {"plain": state, "model": {"model": state, "epoch": 300}, "state_dict": {"state_dict": state}}[wrap]
    path = tmp_path / "vit.pth"
    torch.save(obj, path)
    model = vit()
    report = load_vit_weights(model, path)

    oracle = timm_vit(img_size=(64, 32))
    expected_pos = bilinear_grid(state["pos_embed"], (4, 4), (4, 2))
    oracle.load_state_dict(dict(state, pos_embed=expected_pos))
    assert torch.equal(model.pos_embed, expected_pos)
    assert_state_equal(model, state, skip={"pos_embed"})
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), oracle.forward_features(IMAGES), atol=1e-5, rtol=1e-5)
    assert report.kind == "imagenet" and report.format == "torch.save"
    assert report.resized == {"pos_embed": ((1, 17, 32), (1, 9, 32))}
    assert set(report.loaded) == set(model.state_dict())
    if wrap == "model":
        assert any(s.startswith("epoch") for s in report.ignored)


@pytest.mark.parametrize("img_size, stride, grid", [((256, 128), 16, (16, 8)), ((256, 128), 12, (21, 10)),
                                                    ((384, 128), 16, (24, 8))])
def test_resized_position_table_is_bilinear_exactly(tmp_path, img_size, stride, grid):
    ref = timm_vit(img_size=(224, 224), embed_dim=16, depth=1, num_heads=2)
    pos = ref.pos_embed.detach()
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    model = vit(img_size=img_size, stride=stride, embed_dim=16, depth=1, num_heads=2)
    load_vit_weights(model, tmp_path / "vit.pth")
    side = pos[0, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(side, size=grid, mode="bilinear", align_corners=False, antialias=False)
    expected = expected.flatten(2).transpose(1, 2)
    assert torch.equal(model.pos_embed[:, 1:], expected)
    assert torch.equal(model.pos_embed[:, :1], pos[:, :1])


def test_imagenet_21k_pre_logits_and_head_ignored(tmp_path):
    ref = timm_vit(img_size=(64, 32))
    state = dict(ref.state_dict())
    state["pre_logits.fc.weight"] = torch.randn(32, 32)
    state["pre_logits.fc.bias"] = torch.randn(32)
    state["head.weight"] = torch.randn(21843, 32)
    state["head.bias"] = torch.randn(21843)
    torch.save(state, tmp_path / "in21k.pth")
    model = vit()
    report = load_vit_weights(model, tmp_path / "in21k.pth")
    assert report.kind == "imagenet-21k"
    assert {s.split(" ")[0] for s in report.ignored} == {"pre_logits.fc.weight", "pre_logits.fc.bias",
                                                         "head.weight", "head.bias"}
    assert_state_equal(model, ref.state_dict())
    assert report.resized == {}


def test_deit_distillation_row_dropped(tmp_path):
    ref = timm_vit(img_size=(224, 224), embed_dim=16, depth=1, num_heads=2)
    state = dict(ref.state_dict())
    pos = state["pos_embed"]
    dist_row = torch.full((1, 1, 16), 50.0)  # a row that would stand out anywhere it leaked to
    state["pos_embed"] = torch.cat((pos[:, :1], dist_row, pos[:, 1:]), dim=1)
    assert state["pos_embed"].shape[1] == 198
    state["dist_token"] = torch.randn(1, 1, 16)
    state["head.weight"], state["head.bias"] = torch.randn(10, 16), torch.randn(10)
    state["head_dist.weight"], state["head_dist.bias"] = torch.randn(10, 16), torch.randn(10)
    torch.save({"model": state}, tmp_path / "deit.pth")
    model = vit(img_size=(256, 128), embed_dim=16, depth=1, num_heads=2)
    report = load_vit_weights(model, tmp_path / "deit.pth")
    assert report.kind == "deit"
    expected = bilinear_grid(pos, (14, 14), (16, 8))
    assert torch.equal(model.pos_embed, expected)
    assert model.pos_embed.abs().max() < 50
    assert report.resized == {"pos_embed": ((1, 198, 16), (1, 129, 16))}
    ignored = " ".join(report.ignored)
    for name in ("dist_token", "head_dist.weight", "head.weight", "pos_embed[:, 1]"):
        assert name in ignored


def test_deit_at_model_grid_copies_the_grid(tmp_path):
    """2 prefix tokens + a 4x4 grid into a 64x64 model: no resize, only the distillation row goes."""
    ref = timm_vit(img_size=(64, 64))
    state = dict(ref.state_dict())
    pos = state["pos_embed"]
    state["pos_embed"] = torch.cat((pos[:, :1], torch.randn(1, 1, 32), pos[:, 1:]), dim=1)
    state["dist_token"] = torch.randn(1, 1, 32)
    torch.save({"model": state}, tmp_path / "deit.pth")
    model = vit(img_size=(64, 64))
    load_vit_weights(model, tmp_path / "deit.pth")
    assert torch.equal(model.pos_embed, pos)
    with torch.no_grad():
        images = torch.randn(2, 3, 64, 64)
        torch.testing.assert_close(model(images), ref.forward_features(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_21k_extras", [False, True])
def test_google_npz_matches_timms_reader(tmp_path, with_21k_extras):
    src = timm_vit(img_size=(64, 64), seed=3)
    extra = {}
    if with_21k_extras:
        extra = {"pre_logits/kernel": torch.randn(32, 32), "pre_logits/bias": torch.randn(32),
                 "head/kernel": torch.zeros(32, 21843), "head/bias": torch.zeros(21843)}
    path = tmp_path / "ViT-tiny.npz"
    google_npz(src.state_dict(), num_heads=4, path=path, extra=extra)

    oracle = timm_vit(img_size=(64, 32), seed=7)
    _load_weights(oracle, str(path))
    model = vit()
    report = load_vit_weights(model, path)
    assert report.kind == "google-npz" and report.format == "npz"
    assert_state_equal(model, oracle.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES), oracle.forward_features(IMAGES), atol=1e-5, rtol=1e-5)
    # and the written file round-trips to the source weights (checks the test's own writer)
    assert_state_equal(model, src.state_dict(), skip={"pos_embed"})
    if with_21k_extras:
        assert {s.split(" ")[0] for s in report.ignored} == {"pre_logits/kernel", "pre_logits/bias",
                                                             "head/kernel", "head/bias"}


def test_google_npz_unknown_entries_refused(tmp_path):
    path = tmp_path / "odd.npz"
    google_npz(timm_vit().state_dict(), num_heads=4, path=path, extra={"MAPHead_0/probe": torch.zeros(1, 1, 32)})
    model = vit()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="MAPHead_0/probe"):
        load_vit_weights(model, path)
    assert_state_equal(model, before)


def test_safetensors(tmp_path):
    ref = timm_vit(img_size=(64, 32))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.bin"))
    model = vit()
    report = load_vit_weights(model, tmp_path / "model.bin")  # the name says nothing: content decides
    assert report.format == "safetensors" and report.kind == "imagenet"
    assert_state_equal(model, ref.state_dict())
    assert report.resized == {}


def test_fp16_file_loads_into_fp32_model(tmp_path):
    ref = timm_vit(img_size=(64, 64))
    half = {k: v.half() for k, v in ref.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")
    model = vit()
    load_vit_weights(model, tmp_path / "half.pth")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_state_equal(model, {k: v.float() for k, v in half.items()}, skip={"pos_embed"})
    expected_pos = bilinear_grid(half["pos_embed"].float(), (4, 4), (4, 2))
    assert torch.equal(model.pos_embed, expected_pos)


def test_imagenet_into_model_with_table_keeps_its_init(tmp_path):
    ref = timm_vit(img_size=(64, 32))
    torch.save(ref.state_dict(), tmp_path / "vit.pth")
    model = vit(camera_num=6, view_num=2)
    table = model.sie_embed.detach().clone()
    report = load_vit_weights(model, tmp_path / "vit.pth")
    assert report.kept_init == ["sie_embed"] and "sie_embed" not in report.loaded
    assert torch.equal(model.sie_embed, table)
    assert_state_equal(model, ref.state_dict())
    assert "kept initialisation: sie_embed" in str(report)


# -- TransReID-trained checkpoints --------------------------------------------------------------------------------


def transreid_checkpoint(model: VitTrans, num_classes=5, prefix="") -> dict[str, torch.Tensor]:
    state = {f"{prefix}base.{k}": v.clone() for k, v in model.state_dict().items()}
    d = model.embed_dim
    state[f"{prefix}base.fc.weight"], state[f"{prefix}base.fc.bias"] = torch.randn(1000, d), torch.randn(1000)
    state[f"{prefix}bottleneck.weight"], state[f"{prefix}bottleneck.bias"] = torch.ones(d), torch.zeros(d)
    state[f"{prefix}bottleneck.running_mean"], state[f"{prefix}bottleneck.running_var"] = torch.randn(d), torch.rand(d)
    state[f"{prefix}bottleneck.num_batches_tracked"] = torch.tensor(1200)
    state[f"{prefix}classifier.weight"] = torch.randn(num_classes, d)
    return state


@pytest.mark.parametrize("camera_num, view_num, prefix", [(3, 2, ""), (4, 0, ""), (0, 0, ""), (3, 0, "module.")])
def test_transreid_checkpoint_matches_transreid_forward(tmp_path, camera_num, view_num, prefix):
    trained = vit(stride=12, camera_num=camera_num, view_num=view_num, seed=5)
    assert trained.grid_size == (5, 2)  # a non-square grid, stored as trained
    torch.save(transreid_checkpoint(trained, prefix=prefix), tmp_path / "transformer_120.pth")
    model = vit(stride=12, camera_num=camera_num, view_num=view_num, seed=9)
    report = load_vit_weights(model, tmp_path / "transformer_120.pth")
    assert report.kind == "transreid" and report.resized == {} and report.kept_init == []
    ignored = " ".join(report.ignored)
    for name in ("base.fc.weight", "bottleneck.running_mean", "classifier.weight"):
        assert name in ignored

    cams = torch.tensor([2, 1]) if camera_num else None
    views = torch.tensor([1, 0]) if view_num else None
    if camera_num and view_num:
        row = cams * view_num + views
    else:
        row = cams if camera_num else views
    file_state = {k[len(prefix + "base."):]: v for k, v in torch.load(tmp_path / "transformer_120.pth").items()
                  if k.startswith(prefix + "base.")}
    expected = transreid_forward(file_state, IMAGES, 12, row, 3.0, num_heads=4)
    with torch.no_grad():
        torch.testing.assert_close(model(IMAGES, cam_label=cams, view_label=views), expected,
                                   atol=1e-5, rtol=1e-5)


def test_filter_is_pure():
    """The filter neither loads nor changes the model nor the input mapping."""
    ref = timm_vit(img_size=(64, 64))
    state = dict(ref.state_dict())
    keys = list(state)
    pos = state["pos_embed"].clone()
    model = vit(camera_num=2)
    before = snapshot(model)
    out, report, heads = vit_checkpoint_filter(state, model, "mem", "state dict")
    assert list(state) == keys and torch.equal(state["pos_embed"], pos)
    assert_state_equal(model, before)
    assert set(out) == set(model.state_dict()) and report.loaded == [] and heads == {}
    # a training wrapper and a DDP prefix are the filter's business too, as for the CLIP filter
    wrapped, _, _ = vit_checkpoint_filter({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
                                          model)
    assert all(torch.equal(wrapped[k], out[k]) for k in out)


# -- errors -------------------------------------------------------------------------------------------------------


def failing_load(model, path, match, error=CheckpointError):
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        load_vit_weights(model, path)
    assert_state_equal(model, before)
    return str(info.value)


@pytest.mark.parametrize("keys", [
    {"visual.class_embedding": torch.zeros(32), "visual.conv1.weight": torch.zeros(32, 3, 16, 16)},
    {"class_embedding": torch.zeros(32), "conv1.weight": torch.zeros(32, 3, 16, 16)},
    {"image_encoder.class_embedding": torch.zeros(32), "image_encoder.transformer.resblocks.0.ln_1.weight":
        torch.zeros(32), "classifier.weight": torch.zeros(5, 32)},
])
def test_clip_file_points_to_clip_loader(tmp_path, keys):
    torch.save(keys, tmp_path / "ViT-B-16.pth")
    msg = failing_load(vit(), tmp_path / "ViT-B-16.pth", "load_clip_weights")
    assert "CLIP" in msg and "ClipVisual" in msg


def test_missing_key_named(tmp_path):
    state = dict(timm_vit(img_size=(64, 32)).state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "vit.pth")
    failing_load(vit(), tmp_path / "vit.pth", "blocks.1.mlp.fc2.bias")


def test_depth_mismatch_named(tmp_path):
    torch.save(timm_vit(img_size=(64, 32), depth=3).state_dict(), tmp_path / "vit.pth")
    failing_load(vit(), tmp_path / "vit.pth", "blocks.2")


def test_table_rows_mismatch_names_builder_arguments(tmp_path):
    torch.save(transreid_checkpoint(vit(camera_num=6)), tmp_path / "t.pth")
    msg = failing_load(vit(camera_num=3), tmp_path / "t.pth", "camera_num=6")
    assert "6 rows" in msg and "view_num" in msg


def test_table_in_file_but_not_in_model(tmp_path):
    torch.save(transreid_checkpoint(vit(camera_num=3, view_num=5)), tmp_path / "t.pth")
    msg = failing_load(vit(), tmp_path / "t.pth", "camera_num=15")
    assert "camera_num * view_num = 15" in msg


@pytest.mark.parametrize("trained, model_kw, hint", [
    (dict(img_size=(256, 128), stride=12), dict(img_size=(256, 128), stride=16), "stride_size=12"),
    (dict(img_size=(256, 128), stride=16), dict(img_size=(384, 128), stride=16), "img_size=(256, 128)"),
])
def test_non_square_grid_mismatch_suggests_what_to_build(tmp_path, trained, model_kw, hint):
    torch.save(transreid_checkpoint(vit(embed_dim=16, depth=1, num_heads=2, **trained)), tmp_path / "t.pth")
    model = vit(embed_dim=16, depth=1, num_heads=2, **model_kw)
    msg = failing_load(model, tmp_path / "t.pth", "not a square grid")
    assert hint in msg


def test_patch_size_mismatch(tmp_path):
    torch.save(timm_vit(img_size=(64, 64)).state_dict(), tmp_path / "vit.pth")
    model = VitTrans(img_size=(64, 32), patch_size=8, stride_size=8, embed_dim=32, depth=2, num_heads=4)
    failing_load(model, tmp_path / "vit.pth", r"patch_size=\(16, 16\)")


def test_nonexistent_path():
    msg = failing_load(vit(), "/nonexistent/jx_vit_base_p16_224.pth", "not found", CheckpointNotFoundError)
    assert "/nonexistent/jx_vit_base_p16_224.pth" in msg


@pytest.mark.parametrize("suffix, write", [
    (".pth", lambda s, p: torch.save(s, p)),
    (".npz", lambda s, p: google_npz(s, 4, p)),
    (".safetensors", lambda s, p: save_file({k: v.contiguous() for k, v in s.items()}, str(p))),
])
def test_truncated_file_named(tmp_path, suffix, write):
    path = tmp_path / f"vit{suffix}"
    write(timm_vit(img_size=(64, 32)).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = failing_load(vit(), path, "damaged|cannot|incomplete")
    assert str(path) in msg


def test_nan_in_file_refused(tmp_path):
    state = dict(timm_vit(img_size=(64, 32)).state_dict())
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"].clone()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "vit.pth")
    failing_load(vit(), tmp_path / "vit.pth", "blocks.0.attn.qkv.weight")


def test_wrong_model_type(tmp_path):
    torch.save(timm_vit(img_size=(64, 32)).state_dict(), tmp_path / "vit.pth")
    with pytest.raises(reid_ms.ConfigError, match="for a built model pass its backbone"):
        load_vit_weights(torch.nn.Sequential(vit()), tmp_path / "vit.pth")


def test_exported_from_package():
    assert reid_ms.load_vit_weights is load_vit_weights
    assert reid_ms.weights.load_vit_weights is load_vit_weights


# -- full size ----------------------------------------------------------------------------------------------------


@pytest.mark.full
def test_vit_base_patch16_224_into_reid_grid_matches_timm(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000)
    state = src.state_dict()
    torch.save(state, tmp_path / "jx_vit_base_p16_224.pth")
    with torch.device("meta"):  # uninitialised memory: the load must fill every tensor
        model = VitTrans(img_size=(256, 128), stride_size=16, drop_path_rate=0.0)
    model = model.to_empty(device="cpu").eval()
    report = load_vit_weights(model, tmp_path / "jx_vit_base_p16_224.pth")
    assert report.resized == {"pos_embed": ((1, 197, 768), (1, 129, 768))}

    # built on the meta device (no random init to pay for), then given the file's tensors
    oracle = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=(256, 128), num_classes=1000,
                               device="meta")
    grid = state["pos_embed"][0, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 8), mode="bilinear", align_corners=False, antialias=False)
    pos = torch.cat((state["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)), dim=1)
    oracle.load_state_dict(dict(state, pos_embed=pos), assign=True)
    oracle.eval()
    images = torch.randn(2, 3, 256, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = model(images), oracle.forward_features(images)
    assert got.shape == (2, 129, 768)
    assert (got - expected).abs().max().item() < 1e-4
