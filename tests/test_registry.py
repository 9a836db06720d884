"""The registry: names, routing of overrides to the part they belong to, errors with suggestions."""

from __future__ import annotations

import pytest
import torch

import reid_ms
from reid_ms import CheckpointError, ConfigError, ModelSpec, build, list_models, register
from reid_ms.registry import _ORIGIN, _REGISTRY

TINY_VIT = dict(img_size=(64, 32), embed_dim=32, depth=1, num_heads=4)
TINY_CLIP = dict(img_size=(64, 32), width=32, layers=1, heads=4, output_dim=24)


def test_names():
    assert set(list_models()) >= {"vit_b16", "vit_b16_ms", "vit_b16_ms_light", "clip_b16", "clip_b16_ms",
                                  "clip_b16_ms_light", "clip_b16_adapt_ms", "clip_b16_adapt_ms_light"}
    assert list_models() == sorted(list_models())


def test_overrides_reach_their_part(tiny):
    model = build("vit_b16_ms", **tiny.args("vit_b16_ms", stride_size=12, camera_num=4, view_num=2, sie_coef=1.5,
                                            scales=(2, 3), num_classes=9, neck_feat="after"))
    assert model.backbone.grid_size == (5, 2) and model.backbone.camera_num == 4 and model.backbone.view_num == 2
    assert model.backbone.sie_coef == 1.5 and model.backbone.out_dim == 32
    assert model.neck.scales == (2, 3) and model.neck.feat_dim == 32 and model.neck.mode == "dense"
    assert model.head.num_classes == 9 and model.head.neck_feat == "after" and model.feat_dim == 32
    assert tiny.build("vit_b16_ms", mode="light").neck.mode == "light"
    assert tiny.build("vit_b16_ms_light").neck.pointwise is not None


def test_widths_propagate(tiny):
    clip = tiny.build("clip_b16_ms_light", output_dim=24)
    assert clip.neck.feat_dim == 24 and clip.head.feat_dim == 24 and clip.adapter is None
    adapt = tiny.build("clip_b16_adapt_ms", output_dim=24, adapt_dim=40, adapt_norm=True)
    assert (adapt.adapter.in_dim, adapt.adapter.out_dim) == (24, 40)
    assert isinstance(adapt.adapter.norm, torch.nn.LayerNorm)
    assert adapt.neck.feat_dim == 40 and adapt.feat_dim == 40
    assert build("clip_b16_adapt_ms_light", width=64, layers=1, heads=4).adapter.out_dim == 768  # default width


@pytest.mark.parametrize("name, suggestion", [("vit_b16_mss", "vit_b16_ms"), ("clip_b16_adapt_ms_lite",
                                                                             "clip_b16_adapt_ms_light")])
def test_unknown_model(name, suggestion):
    with pytest.raises(ConfigError, match=f"unknown model '{name}'; did you mean '{suggestion}'"):
        build(name)


@pytest.mark.parametrize("name, arg, suggestion", [
    ("vit_b16_ms", "scale", "scales"), ("vit_b16", "num_class", "num_classes"),
    ("clip_b16", "output_dims", "output_dim"), ("clip_b16_adapt_ms", "adapt_dims", "adapt_dim"),
])
def test_unknown_argument(name, arg, suggestion):
    with pytest.raises(ConfigError, match=f"unknown argument '{arg}'; did you mean '{suggestion}'"):
        build(name, **{arg: 1})


@pytest.mark.parametrize("name, arg", [("vit_b16", "scales"), ("clip_b16_ms", "adapt_dim"), ("clip_b16", "mode")])
def test_argument_of_a_missing_part(name, arg):
    with pytest.raises(ConfigError, match=f"'{name}' has no (neck|adapter); models with one: "):
        build(name, **{arg: 8})


def test_bad_values_reach_the_part_that_checks_them(tiny):
    with pytest.raises(ConfigError, match="scales"):
        tiny.build("vit_b16_ms", scales=(0,))
    with pytest.raises(ConfigError, match="neck_feat"):
        tiny.build("vit_b16", neck_feat="middle")


def test_pretrained_of_the_wrong_family(tmp_path, tiny):
    path = tmp_path / "vit.pth"
    torch.save(tiny.build("vit_b16").backbone.state_dict(), path)
    with pytest.raises(CheckpointError, match="load_vit_weights"):
        build("clip_b16", pretrained=str(path), **tiny.args("clip_b16"))


@pytest.fixture
def scratch_name():
    name = "test_vit_tiny_light"
    yield name
    _REGISTRY.pop(name, None)
    _ORIGIN.pop(name, None)


def test_register_a_model(scratch_name, tiny):
    @register(scratch_name)
    def tiny_light() -> ModelSpec:
        return ModelSpec(reid_ms.VitTrans, reid_ms.load_vit_weights,
                         dict(tiny.BACKBONES["VitTrans"], embed_dim=16, depth=1), neck_mode="light")

    assert scratch_name in list_models()
    model = build(scratch_name, depth=2)
    assert model.feat_dim == 16 and len(model.backbone.blocks) == 2 and model.neck.mode == "light"
    assert model.eval()(torch.randn(2, 3, 64, 32)).shape == (2, 16)


def test_registering_again(scratch_name):
    def define(embed_dim):  # the same definition run twice, as a re-run notebook cell does
        @register(scratch_name)
        def tiny() -> ModelSpec:
            return ModelSpec(reid_ms.VitTrans, reid_ms.load_vit_weights, dict(TINY_VIT, embed_dim=embed_dim))
        return tiny

    define(16)
    define(24)
    assert build(scratch_name).feat_dim == 24

    def other() -> ModelSpec:
        return ModelSpec(reid_ms.VitTrans, reid_ms.load_vit_weights, dict(TINY_VIT, embed_dim=8))

    with pytest.raises(ConfigError, match=r"already registered \(by test_registry.test_registering_again.<locals>"
                                          r".define.<locals>.tiny\).*override=True"):
        register(scratch_name)(other)
    assert build(scratch_name).feat_dim == 24
    register(scratch_name, override=True)(other)
    assert build(scratch_name).feat_dim == 8
    with pytest.raises(ConfigError, match="already registered"):  # a library's own name is not replaced by accident
        register("vit_b16")(other)


def test_register_refuses_what_is_not_a_spec():
    with pytest.raises(ConfigError, match="returning a ModelSpec"):
        register("test_not_a_spec")(lambda: {"backbone": "vit"})
    assert "test_not_a_spec" not in list_models()


def test_public_names(tiny):
    assert reid_ms.build is build and reid_ms.list_models is list_models and reid_ms.register is register
    assert reid_ms.ReIDModel is type(tiny.build("vit_b16"))


# -- pretrained: saved models load by name, one read, a path only ------------------------------------------------


def _tiny_build_args(name: str) -> dict:
    spec = reid_ms.registry.get_spec(name)
    vit = spec.backbone is reid_ms.VitTrans
    args = dict(TINY_VIT, depth=2) if vit else dict(TINY_CLIP, layers=2)
    args.update(camera_num=3, num_classes=5)
    if spec.adapt_dim is not None:
        args["adapt_dim"] = 40
    return args


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer away from its initialisation (zero necks, BN statistics included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "running_var" in k
                        else torch.randn(t.shape, generator=gen) * 0.2)
            else:
                t.fill_(7)
    return model.eval()


def _inputs(model: torch.nn.Module) -> object:
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(9))
    return {m: x + i for i, m in enumerate(model.modalities)} if hasattr(model, "modalities") else x


@pytest.mark.parametrize("name, wrapped", [(name, False) for name in list_models()]
                         + [("vit_b16_ms_jpm", True), ("clip_b16_ms_rgbnt", True)])
def test_a_saved_model_loads_exactly_by_name(name, wrapped, tmp_path):
    args = _tiny_build_args(name)
    torch.manual_seed(0)
    source = _randomised(build(name, **args), seed=1)
    path = tmp_path / "saved.pt"
    # reid-ms train writes {"model": state_dict, "epoch": ...}; a user writes the state dict itself
    torch.save({"model": source.state_dict(), "epoch": 3} if wrapped else source.state_dict(), path)
    torch.manual_seed(1)
    model = build(name, pretrained=path, **args).eval()
    assert model.load_report.kind == "reid_ms" and model.load_report.kept_init == []
    assert sorted(model.load_report.loaded) == sorted(source.state_dict())
    assert ("epoch" in model.load_report.ignored) == wrapped
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(model(_inputs(model), cam_label=1), source(_inputs(source), cam_label=1))


def test_a_saved_model_of_another_build_is_refused_by_name(tmp_path):
    path = tmp_path / "saved.pt"
    torch.save(build("vit_b16_ms", **_tiny_build_args("vit_b16_ms")).state_dict(), path)
    with pytest.raises(CheckpointError, match="missing .*neck|unexpected .*neck"):
        build("vit_b16", pretrained=path, **_tiny_build_args("vit_b16"))
    with pytest.raises(CheckpointError, match="'head.classifier.weight' has shape"):
        build("vit_b16_ms", pretrained=path, **{**_tiny_build_args("vit_b16_ms"), "num_classes": 4})


def test_pretrained_takes_a_path_and_is_checked_before_building(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before pretrained was checked")

    monkeypatch.setattr(reid_ms.VitTrans, "__init__", no_build)
    for value in (True, 1, ["a.pth"]):
        with pytest.raises(ConfigError, match="pretrained takes the path of a local checkpoint"):
            build("vit_b16", pretrained=value)


def test_a_transreid_checkpoint_is_read_once(tmp_path, monkeypatch):
    args = _tiny_build_args("vit_b16")
    backbone = reid_ms.VitTrans(**{k: v for k, v in args.items() if k != "num_classes"})
    head = {"bottleneck.weight": torch.rand(32) + 0.5, "bottleneck.bias": torch.zeros(32),
            "bottleneck.running_mean": torch.randn(32), "bottleneck.running_var": torch.rand(32) + 0.5,
            "bottleneck.num_batches_tracked": torch.tensor(5), "classifier.weight": torch.randn(5, 32)}
    path = tmp_path / "transreid.pth"
    torch.save({f"base.{k}": v for k, v in backbone.state_dict().items()} | head, path)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: reads.append(a[0]) or real_load(*a, **kw))
    model = build("vit_b16", pretrained=path, **args)
    assert reads == [str(path)]
    assert torch.equal(model.head.classifier.weight, head["classifier.weight"])
    assert "head.bottleneck.running_var" in model.load_report.loaded
    assert not any(k.startswith(("bottleneck.", "classifier.")) for k in model.load_report.ignored)


def test_a_saved_model_loads_by_name_in_the_cli(tmp_path):
    """The file decides every weight: extracts under two seeds agree, and differ without the file."""
    import numpy as np
    from PIL import Image

    from reid_ms.cli import main

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(images / f"000{i}_c1s1_00000{i}_00.jpg")
    model = _randomised(build("vit_b16_ms", embed_dim=32, depth=2, num_heads=4, img_size=(64, 32)), seed=3)
    weights = tmp_path / "last.pt"
    torch.save({"model": model.state_dict(), "epoch": 1}, weights)
    model_args = ["vit_b16_ms", "--img-size", "64", "32", "--set", "embed_dim=32", "--set", "depth=2",
                  "--set", "num_heads=4", "--images", str(images), "-q"]
    feats = {}
    for run, extra in {"seed0": ["--weights", str(weights)], "seed1": ["--weights", str(weights), "--seed", "1"],
                       "random": []}.items():
        assert main(["extract", *model_args, *extra, "--out", str(tmp_path / f"{run}.npz")]) == 0
        feats[run] = np.load(tmp_path / f"{run}.npz")["feats"]
    assert np.array_equal(feats["seed0"], feats["seed1"])
    assert not np.allclose(feats["seed0"], feats["random"])


def test_load_multimodal_weights_lives_in_weights_which_imports_no_model(tmp_path):
    import ast
    from pathlib import Path

    import reid_ms.weights
    from reid_ms.weights.multimodal import load_multimodal_weights

    assert reid_ms.load_multimodal_weights is load_multimodal_weights
    for source in Path(reid_ms.weights.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("reid_ms.model", "reid_ms.registry")), source.name
    model = build("clip_b16_ms_rgbnt", **_tiny_build_args("clip_b16_ms_rgbnt"))
    source = _randomised(reid_ms.ClipVisual(**{**TINY_CLIP, "layers": 2, "camera_num": 3}), seed=4)
    path = tmp_path / "clip.pth"
    torch.save(source.state_dict(), path)
    neck_before = {k: v.clone() for k, v in model.neck.state_dict().items()}
    report = load_multimodal_weights(model, path)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in source.state_dict().items())
    assert all(torch.equal(model.neck.state_dict()[k], v) for k, v in neck_before.items())
    assert {f"neck.{k}" for k in neck_before} <= set(report.kept_init)
    with pytest.raises(ConfigError, match="VitTrans or ClipVisual backbone"):
        load_multimodal_weights(torch.nn.Linear(2, 2), path)
