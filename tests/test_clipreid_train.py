"""``--recipe clipreid`` runs both CLIP-ReID stages on tiny CLIP models and a tiny synthetic set."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import reid_ms.training.clipreid as text_stage
from reid_ms.errors import ConfigError
from reid_ms.training import RECIPES, train

ROOT = Path(__file__).resolve().parents[1]

# image side: 32x16 images, 8x8 patches (a 4x2 grid), 16 wide, one block; text side: one block, 16 wide
TINY_CLIP = {"patch_size": 8, "stride_size": 8, "width": 16, "layers": 1, "heads": 2, "output_dim": 16,
             "text_width": 16, "text_layers": 1, "text_heads": 2, "stage1_epochs": 3, "stage1_batch_size": 8,
             "milestones": (1,)}
EXTRA = {"clip_b16": {}, "clip_b16_ms": {"scales": (2, 4)}, "clip_b16_adapt_ms": {"scales": (2, 4), "adapt_dim": 24}}


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    """6 training ids x 4 cameras (24 crops), 4 test ids."""
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "examples" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path_factory.mktemp("market")
    module.make_market_data(out, people=4, train_people=6, per_camera=1)
    return out


def _run(market, out, name="clip_b16", resume=False, **overrides):
    return train(name, dataset="folder", root=market, out=out, recipe="clipreid", img_size=(32, 16), epochs=1,
                 batch_size=8, num_instances=2, overrides={**TINY_CLIP, **EXTRA.get(name, {}), **overrides},
                 workers=0, progress=False, resume=resume)


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_both_stages_run_for_every_clip_model(market, tmp_path, one_thread, name):
    result = _run(market, tmp_path / name, name)
    rows = [json.loads(line) for line in (tmp_path / name / "stage1.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(1e-5 + (3.5e-4 - 1e-5) / 5)  # CLIP-ReID's warm-up, epoch 1 of 5
    state = torch.load(result.checkpoint, weights_only=True)["hooks"][0]
    assert state["text_features"].shape == (6, 16) and state["cls_ctx"].shape == (6, 4, 16)
    assert 0 <= result.history[-1]["mAP"] <= 1


def test_the_image_to_text_loss_is_added_to_stage_2(market, tmp_path, one_thread):
    with_i2t = _run(market, tmp_path / "with").history[0]["loss"]
    without = _run(market, tmp_path / "without", i2t_weight=0.0).history[0]["loss"]
    # the same seed gives the same start: the difference is the i2t term, cross-entropy over 6 identities
    assert 0.5 < with_i2t - without < 2 * torch.log(torch.tensor(6.0)).item()


def test_a_resumed_run_keeps_its_prompts(market, tmp_path, one_thread, monkeypatch):
    out = tmp_path / "run"
    first = torch.load(_run(market, out).checkpoint, weights_only=True)["hooks"][0]
    monkeypatch.setattr(text_stage, "learn_prompts", lambda *a, **k: pytest.fail("stage 1 ran again on resume"))
    _run(market, out, resume=True)
    hook = RECIPES["clipreid"].hooks[0]
    torch.testing.assert_close(hook.text_features.cpu(), first["text_features"], rtol=0, atol=0)


def test_models_without_a_clip_image_encoder_are_refused(market, tmp_path):
    with pytest.raises(ConfigError, match="CLIP image encoder"):
        train("vit_b16", dataset="folder", root=market, out=tmp_path, recipe="clipreid", img_size=(32, 16), epochs=1,
              batch_size=8, num_instances=2, overrides={"patch_size": 8, "stride_size": 8, "embed_dim": 16, "depth": 1,
                                                        "num_heads": 2, "milestones": (1,)}, workers=0, progress=False)
