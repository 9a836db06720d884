"""torch.export and ONNX export of every registered model, camera/view labels as inputs, dynamic batch.

Each model is built tiny, with the embedding taken after the BNNeck, and every parameter and BatchNorm
statistic is randomised first: a fresh dense neck starts at zero and a fresh BNNeck is the identity, so
parity on a fresh model would not show that the neck or the head made it into the graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reid_ms
from reid_ms.errors import ConfigError
from reid_ms.export import example_inputs, export_onnx, export_program, onnx_max_error
from reid_ms.registry import get_spec

TINY_VIT = dict(img_size=(64, 32), stride_size=12, embed_dim=32, depth=1, num_heads=4)   # 5 x 2 grid, overlapping
TINY_CLIP = dict(img_size=(64, 32), width=32, layers=1, heads=4, output_dim=24)          # 4 x 2 grid
TINY_NECK = dict(scales=(2, 4))          # grids not divisible by the windows, one window wider than the grid

# (name, camera_num, view_num): every registered model with a camera table, one per backbone with a
# view table too (VitTrans adds the row to every token, ClipVisual to the CLS only).
WITH_VIEWS = ("vit_b16_ms", "clip_b16_adapt_ms_light")
# Multi-modal models take a dict of image batches, which export_program / export_onnx do not build yet;
# tests/test_multimodal.py exports them with torch.export directly.
REGISTERED = [(name, 3, 2 if name in WITH_VIEWS else 0) for name in reid_ms.list_models()
              if get_spec(name).model is not reid_ms.MultiModalReIDModel]
NO_TABLE = [("vit_b16", 0, 0), ("clip_b16_ms", 0, 0)]


def _tiny(name: str, camera_num: int, view_num: int) -> reid_ms.ReIDModel:
    kwargs = dict(TINY_VIT if name.startswith("vit") else TINY_CLIP, camera_num=camera_num, view_num=view_num,
                  neck_feat="after")
    if "_ms" in name:
        kwargs.update(TINY_NECK)
    if "adapt" in name:
        kwargs["adapt_dim"] = 40
    torch.manual_seed(0)
    model = reid_ms.build(name, **kwargs)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
        bn = model.head.bottleneck
        bn.running_mean.copy_(torch.randn_like(bn.running_mean))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    return model.eval()


def _new_inputs(model: reid_ms.ReIDModel, batch: int) -> dict[str, torch.Tensor]:
    """Inputs of another batch size than the traced one (2), with every label value present."""
    backbone = model.backbone
    inputs = {"images": torch.randn(batch, 3, *backbone.img_size, generator=torch.Generator().manual_seed(7))}
    if backbone.camera_num:
        inputs["cam_label"] = torch.arange(batch) % backbone.camera_num
    if backbone.view_num:
        inputs["view_label"] = torch.arange(batch).flip(0) % backbone.view_num
    return inputs


def _eager(model: reid_ms.ReIDModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = dict(inputs)
    with torch.inference_mode():
        return model(inputs.pop("images"), **inputs)


def _label_names(camera_num: int, view_num: int) -> list[str]:
    return ["images"] + ["cam_label"] * (camera_num > 0) + ["view_label"] * (view_num > 0)


@pytest.mark.parametrize("name, camera_num, view_num", REGISTERED + NO_TABLE)
def test_torch_export_matches_eager(name, camera_num, view_num):
    model = _tiny(name, camera_num, view_num)
    program = export_program(model)
    assert [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"] \
        == _label_names(camera_num, view_num)
    exported = program.module()
    for batch in (1, 5):
        inputs = _new_inputs(model, batch)
        expected = _eager(model, inputs)
        images = inputs.pop("images")
        with torch.no_grad():
            got = exported(images, **inputs)
        assert got.shape == (batch, model.feat_dim)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if camera_num:
        # the same image under each camera: the label reaches the graph and changes the embedding
        same = torch.randn(1, 3, *model.backbone.img_size).expand(3, -1, -1, -1)
        labels = {"cam_label": torch.arange(3)}
        if view_num:
            labels["view_label"] = torch.zeros(3, dtype=torch.long)
        with torch.no_grad():
            out = exported(same, **labels)
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


@pytest.mark.parametrize("name, camera_num, view_num", REGISTERED + NO_TABLE[:1])
def test_onnx_matches_eager_in_onnxruntime(name, camera_num, view_num, tmp_path):
    import onnxruntime

    model = _tiny(name, camera_num, view_num)
    path = tmp_path / f"{name}.onnx"
    names = export_onnx(model, path)
    assert names == _label_names(camera_num, view_num)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    assert [o.name for o in session.get_outputs()] == ["features"]
    for batch in (1, 5):
        inputs = _new_inputs(model, batch)
        expected = _eager(model, inputs).numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        assert got.shape == (batch, model.feat_dim)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert onnx_max_error(model, path, batch=4) <= 1e-4


def test_onnx_max_error_sees_another_model(tmp_path):
    path = tmp_path / "a.onnx"
    export_onnx(_tiny("vit_b16", 3, 0), path)
    other = _tiny("vit_b16", 3, 0)
    with torch.no_grad():
        other.head.bottleneck.running_mean.add_(1.0)
    assert onnx_max_error(other, path) > 0.1


def test_example_inputs_follow_the_tables():
    model = _tiny("clip_b16", 3, 2)
    inputs = example_inputs(model, batch=4, generator=torch.Generator().manual_seed(0))
    assert list(inputs) == ["images", "cam_label", "view_label"]
    assert inputs["images"].shape == (4, 3, 64, 32) and inputs["cam_label"].dtype == torch.long
    assert 0 <= int(inputs["cam_label"].min()) and int(inputs["cam_label"].max()) < 3
    assert 0 <= int(inputs["view_label"].min()) and int(inputs["view_label"].max()) < 2
    with pytest.raises(ConfigError, match="img_size and in_chans"):
        example_inputs(torch.nn.Linear(2, 2))
