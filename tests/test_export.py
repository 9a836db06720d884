"""torch.export and ONNX export of every registered model, camera/view labels as inputs, dynamic batch.

Multi-modal models take one image batch per modality: graph inputs ``rgb``, ``nir``, ``tir`` instead of
``images``, sharing the dynamic batch with the labels.

Each model is built tiny, with the embedding taken after the BNNeck, and every parameter and BatchNorm
statistic is randomised first: a fresh dense neck starts at zero and a fresh BNNeck is the identity, so
parity on a fresh model would not show that the neck or the head made it into the graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import reid_ms
from reid_ms.errors import ConfigError, InputError
from reid_ms.export import call_args, example_inputs, export_onnx, export_program, onnx_max_error
from reid_ms.registry import get_spec

# (name, camera_num, view_num): every registered model with a camera table, one per backbone with a
# view table too (VitTrans adds the row to every token, ClipVisual to the CLS only).
WITH_VIEWS = ("vit_b16_ms", "clip_b16_adapt_ms_light")
REGISTERED = [(name, 3, 2 if name in WITH_VIEWS else 0) for name in reid_ms.list_models()]
NO_TABLE = [("vit_b16", 0, 0), ("clip_b16_ms", 0, 0), ("vit_b16_ms_rgbnt", 0, 0)]
MODALITIES = ("rgb", "nir", "tir")


def _multimodal(name: str) -> bool:
    return get_spec(name).model is reid_ms.MultiModalReIDModel


def _tiny(tiny, name: str, camera_num: int, view_num: int) -> torch.nn.Module:
    """One block, the embedding after the BNNeck, every parameter and statistic randomised (see TinyModels)."""
    model = tiny.build(name, blocks=1, camera_num=camera_num, view_num=view_num, neck_feat="after", randomize=True)
    return model.eval()


def _image_names(model: torch.nn.Module) -> tuple[str, ...]:
    return MODALITIES if isinstance(model, reid_ms.MultiModalReIDModel) else ("images",)


def _new_inputs(model: torch.nn.Module, batch: int) -> dict[str, torch.Tensor]:
    """Inputs by graph name, of another batch size than the traced one (2), with every label value present."""
    backbone = model.backbone
    gen = torch.Generator().manual_seed(7)
    inputs = {name: torch.randn(batch, 3, *backbone.img_size, generator=gen) for name in _image_names(model)}
    if backbone.camera_num:
        inputs["cam_label"] = torch.arange(batch) % backbone.camera_num
    if backbone.view_num:
        inputs["view_label"] = torch.arange(batch).flip(0) % backbone.view_num
    return inputs


def _call(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, torch.Tensor]]:
    """``(args, kwargs)`` of the model's call, written out: a dict of modality batches or one image batch."""
    inputs = dict(inputs)
    if isinstance(model, reid_ms.MultiModalReIDModel):
        images = {m: inputs.pop(m) for m in MODALITIES}
    else:
        images = inputs.pop("images")
    return (images,), inputs


def _eager(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    args, kwargs = _call(model, inputs)
    with torch.inference_mode():
        return model(*args, **kwargs)


def _input_names(name: str, camera_num: int, view_num: int) -> list[str]:
    images = list(MODALITIES) if _multimodal(name) else ["images"]
    return images + ["cam_label"] * (camera_num > 0) + ["view_label"] * (view_num > 0)


@pytest.mark.parametrize("name, camera_num, view_num", REGISTERED + NO_TABLE)
def test_torch_export_matches_eager(name, camera_num, view_num, tiny):
    model = _tiny(tiny, name, camera_num, view_num)
    program = export_program(model)
    # torch.export names the entries of the dict argument `inputs` of a multi-modal model inputs_<key>
    assert [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"] \
        == [f"inputs_{n}" if n in MODALITIES else n for n in _input_names(name, camera_num, view_num)]
    exported = program.module()
    for batch in (1, 5):
        inputs = _new_inputs(model, batch)
        expected = _eager(model, inputs)
        args, kwargs = _call(model, inputs)
        with torch.no_grad():
            got = exported(*args, **kwargs)
        assert got.shape == (batch, model.feat_dim)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if camera_num:
        # the same image under each camera: the label reaches the graph and changes the embedding
        same = torch.randn(1, 3, *model.backbone.img_size).expand(3, -1, -1, -1)
        labels = {"cam_label": torch.arange(3)}
        if view_num:
            labels["view_label"] = torch.zeros(3, dtype=torch.long)
        args, _ = _call(model, {name: same for name in _image_names(model)})
        with torch.no_grad():
            out = exported(*args, **labels)
        assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


@pytest.mark.parametrize("name, camera_num, view_num", REGISTERED + NO_TABLE[:1])
def test_onnx_matches_eager_in_onnxruntime(name, camera_num, view_num, tmp_path, tiny):
    import onnxruntime

    model = _tiny(tiny, name, camera_num, view_num)
    path = tmp_path / f"{name}.onnx"
    names = export_onnx(model, path)
    assert names == _input_names(name, camera_num, view_num)
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


def test_onnx_max_error_sees_another_model(tmp_path, tiny):
    path = tmp_path / "a.onnx"
    export_onnx(_tiny(tiny, "vit_b16", 3, 0), path)
    other = _tiny(tiny, "vit_b16", 3, 0)
    with torch.no_grad():
        other.head.bottleneck.running_mean.add_(1.0)
    assert onnx_max_error(other, path) > 0.1


def test_example_inputs_follow_the_tables(tiny):
    model = _tiny(tiny, "clip_b16", 3, 2)
    inputs = example_inputs(model, batch=4, generator=torch.Generator().manual_seed(0))
    assert list(inputs) == ["images", "cam_label", "view_label"]
    assert inputs["images"].shape == (4, 3, 64, 32) and inputs["cam_label"].dtype == torch.long
    assert 0 <= int(inputs["cam_label"].min()) and int(inputs["cam_label"].max()) < 3
    assert 0 <= int(inputs["view_label"].min()) and int(inputs["view_label"].max()) < 2
    with pytest.raises(ConfigError, match="img_size and in_chans"):
        example_inputs(torch.nn.Linear(2, 2))


def test_example_inputs_of_a_multimodal_model_and_its_call(tiny):
    model = _tiny(tiny, "clip_b16_ms_rgbnt", 3, 0)
    inputs = example_inputs(model, batch=3, generator=torch.Generator().manual_seed(0))
    assert list(inputs) == ["rgb", "nir", "tir", "cam_label"]
    assert all(inputs[m].shape == (3, 3, 64, 32) for m in MODALITIES)
    assert not torch.equal(inputs["rgb"], inputs["nir"])          # one draw per modality, not one image copied
    args, kwargs = call_args(model, inputs)
    assert list(args[0]) == list(MODALITIES) and list(kwargs) == ["cam_label"]
    assert all(args[0][m] is inputs[m] for m in MODALITIES)


def test_onnx_max_error_refuses_a_file_of_other_inputs(tmp_path, tiny):
    path = tmp_path / "single.onnx"
    export_onnx(_tiny(tiny, "vit_b16", 3, 0), path)
    with pytest.raises(InputError, match="takes the inputs"):
        onnx_max_error(_tiny(tiny, "vit_b16_ms_rgbnt", 3, 0), path)
