"""Determinism and round trips for every registered model at a tiny size.

Eval outputs are bit-identical across calls and across two models built from the same seed; a
state dict saved and loaded into a model built from another seed, ``copy.deepcopy`` and
``pickle.dumps`` / ``loads`` all give bit-identical outputs. An image's embedding does not depend on
the other images of its batch beyond float rounding (the kernels may block a batch differently).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import reid_ms

CAMERAS = 3


@pytest.fixture
def build(tiny):
    """``build(name, seed)``: a tiny model, weights and BNNeck statistics nudged off their initialisation."""

    def build(name: str, seed: int) -> torch.nn.Module:
        model = tiny.build(name, seed=seed, camera_num=CAMERAS, num_classes=5).eval()
        # BatchNorm statistics and weights away from their init, so a lost buffer shows in the output
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            model.head.bottleneck.running_mean.normal_()
            model.head.bottleneck.running_var.uniform_(0.5, 2.0)
        model.head.neck_feat = "after"  # the embedding then goes through the BNNeck's statistics
        return model

    return build


IMAGES = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(1))
CAMS = torch.tensor([0, 2, 1, 2])


def model_inputs(model, images: torch.Tensor):
    """The images as the model takes them: a multi-modal model gets one batch per modality (offset copies)."""
    if isinstance(model, reid_ms.MultiModalReIDModel):
        return {m: images + 0.5 * i for i, m in enumerate(model.modalities)}
    return images


def embed(model) -> torch.Tensor:
    with torch.no_grad():
        return model(model_inputs(model, IMAGES), cam_label=CAMS)


@pytest.fixture(params=reid_ms.list_models())
def name(request):
    return request.param


def test_eval_outputs_repeat_exactly(name, build):
    model = build(name, seed=0)
    first = embed(model)
    assert torch.isfinite(first).all()
    assert torch.equal(embed(model), first)


def test_same_seed_same_model(name, build):
    a, b = build(name, seed=0), build(name, seed=0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert torch.equal(embed(a), embed(b))
    assert not torch.equal(embed(build(name, seed=1)), embed(a))


def test_state_dict_save_load_round_trip(name, build):
    source = build(name, seed=0)
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    target = build(name, seed=1)
    assert not torch.equal(embed(target), embed(source))
    buf.seek(0)
    target.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(embed(target), embed(source))


def test_deepcopy_is_equal_and_independent(name, build):
    model = build(name, seed=0)
    expected = embed(model)
    clone = copy.deepcopy(model)
    assert torch.equal(embed(clone), expected)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert torch.equal(embed(model), expected)
    assert not torch.equal(embed(clone), expected)


def test_pickle_round_trip(name, build):
    model = build(name, seed=0)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is type(model) and restored.model_name == name
    assert torch.equal(embed(restored), embed(model))


def test_embedding_does_not_depend_on_the_rest_of_the_batch(name, build):
    model = build(name, seed=0)
    batch = embed(model)
    with torch.no_grad():
        alone = torch.cat([model(model_inputs(model, IMAGES[i:i + 1]), cam_label=CAMS[i:i + 1])
                           for i in range(len(IMAGES))])
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-5)
