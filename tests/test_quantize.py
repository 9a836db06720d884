"""reid_ms.quantize: both int8 backends agree with the fp32 model, take the model's labels, and refuse misuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import reid_ms

TINY = dict(embed_dim=64, depth=1, num_heads=2, img_size=(32, 32))


def _model(**kw):
    torch.manual_seed(0)
    model = reid_ms.build("vit_b16", **{**TINY, **kw}).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)              # zero-initialised biases: make them count
        model.head.bottleneck.running_mean.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_int8_embeddings_follow_fp32(backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    model = _model(camera_num=3)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cams = torch.tensor([0, 2, 1, 1, 0])
    with torch.no_grad():
        expected = model(x, cam_label=cams)
    q = reid_ms.quantize(model, backend=backend)
    with torch.no_grad():                                      # eval-mode use, as model(...) above
        got = q(x, cam_label=cams)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert float(F.cosine_similarity(got, expected).min()) > 0.99
        assert not torch.equal(got, expected)                  # int8 arithmetic, not the fp32 model again
        # cameras reach the graph: another camera gives another embedding
        assert float((q(x, cam_label=torch.tensor([1, 0, 2, 0, 2])) - got).abs().max()) > 1e-4
        # the model passed in is untouched
        assert isinstance(model.backbone.blocks[0].attn.qkv, torch.nn.Linear)
        with pytest.raises(reid_ms.InputError, match="cam_label"):
            q(x)
        if backend == "onnxruntime":
            with pytest.raises(reid_ms.InputError, match=r"\[0, 2\]"):
                q(x, cam_label=torch.tensor([0, 3, 0, 0, 0]))
            torch.testing.assert_close(q(x, cam_label=1), q(x, cam_label=torch.ones(5, dtype=torch.long)))


def test_bad_backend():
    with pytest.raises(reid_ms.ConfigError, match="backend"):
        reid_ms.quantize(_model(), backend="tensorrt")
