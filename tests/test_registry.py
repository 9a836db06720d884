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


def test_overrides_reach_their_part():
    model = build("vit_b16_ms", stride_size=12, camera_num=4, view_num=2, sie_coef=1.5, scales=(2, 3),
                  num_classes=9, neck_feat="after", **TINY_VIT)
    assert model.backbone.grid_size == (5, 2) and model.backbone.camera_num == 4 and model.backbone.view_num == 2
    assert model.backbone.sie_coef == 1.5 and model.backbone.out_dim == 32
    assert model.neck.scales == (2, 3) and model.neck.feat_dim == 32 and model.neck.mode == "dense"
    assert model.head.num_classes == 9 and model.head.neck_feat == "after" and model.feat_dim == 32
    assert build("vit_b16_ms", mode="light", **TINY_VIT).neck.mode == "light"
    assert build("vit_b16_ms_light", **TINY_VIT).neck.pointwise is not None


def test_widths_propagate():
    clip = build("clip_b16_ms_light", **TINY_CLIP)
    assert clip.neck.feat_dim == 24 and clip.head.feat_dim == 24 and clip.adapter is None
    adapt = build("clip_b16_adapt_ms", adapt_dim=40, adapt_norm=True, **TINY_CLIP)
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


def test_bad_values_reach_the_part_that_checks_them():
    with pytest.raises(ConfigError, match="scales"):
        build("vit_b16_ms", scales=(0,), **TINY_VIT)
    with pytest.raises(ConfigError, match="neck_feat"):
        build("vit_b16", neck_feat="middle", **TINY_VIT)


def test_pretrained_of_the_wrong_family(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(reid_ms.VitTrans(**TINY_VIT).state_dict(), path)
    with pytest.raises(CheckpointError, match="load_vit_weights"):
        build("clip_b16", pretrained=str(path), **TINY_CLIP)


@pytest.fixture
def scratch_name():
    name = "test_vit_tiny_light"
    yield name
    _REGISTRY.pop(name, None)
    _ORIGIN.pop(name, None)


def test_register_a_model(scratch_name):
    @register(scratch_name)
    def tiny() -> ModelSpec:
        return ModelSpec(reid_ms.VitTrans, reid_ms.load_vit_weights, dict(TINY_VIT, embed_dim=16),
                         neck_mode="light")

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


def test_public_names():
    assert reid_ms.build is build and reid_ms.list_models is list_models and reid_ms.register is register
    assert reid_ms.ReIDModel is type(build("vit_b16", **TINY_VIT))
