"""CLIP-ReID's stages as library functions: losses against formulas written out, stage 1 learning, full loads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _helpers_clip import TINY, randomise_norms_and_biases
from reid_ms import CheckpointError, ClipText, ClipVisual, InputError, PromptLearner
from reid_ms.clipreid import (Stage1Config, extract_image_features, image_to_text_loss, learn_prompts,
                              load_clipreid_checkpoint, stage1_epoch, stage1_optimizer)

SMALL_TEXT = dict(context_length=77, vocab_size=49408, width=32, layers=1, heads=2, output_dim=16)


def _supcon_by_hand(a, b, a_pids, b_pids):
    """Minus the mean over rows of the mean log-softmax over each row's positives (temperature 1)."""
    rows = []
    for i in range(len(a)):
        log_p = torch.log_softmax(a[i] @ b.t(), dim=0)
        rows.append(log_p[b_pids == a_pids[i]].mean())
    return -torch.stack(rows).mean()


@pytest.fixture
def prompts():
    torch.manual_seed(0)
    text = ClipText(**SMALL_TEXT)
    randomise_norms_and_biases(text)
    return PromptLearner(text, num_classes=6)


def test_image_to_text_loss_is_label_smoothed_cross_entropy_of_the_dot_products():
    gen = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=gen), torch.randn(7, 8, generator=gen)
    pids = torch.tensor([0, 6, 3, 3, 1])
    got = image_to_text_loss(image, text, pids)
    logits = image @ text.t()
    # (1 - eps) on the true identity plus eps / C on every identity
    log_p = torch.log_softmax(logits, dim=1)
    want = -(0.9 * log_p[torch.arange(5), pids] + 0.1 / 7 * log_p.sum(1)).mean()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(image_to_text_loss(image, text, pids, epsilon=0.0), F.cross_entropy(logits, pids))
    with pytest.raises(InputError, match="same width"):
        image_to_text_loss(image, text[:, :4], pids)


def test_stage1_step_minimises_supcon_both_ways_over_cls_ctx_only(prompts):
    gen = torch.Generator().manual_seed(1)
    pids = torch.tensor([0, 1, 1, 4, 4, 4])
    feats = torch.randn(6, 16, generator=gen)
    text_before = {k: v.clone() for k, v in prompts.text.state_dict().items()}
    with torch.no_grad():
        text = prompts(pids)
    want = _supcon_by_hand(feats, text, pids, pids) + _supcon_by_hand(text, feats, pids, pids)
    ctx_before = prompts.cls_ctx.detach().clone()
    optimizer = stage1_optimizer(prompts)
    got = stage1_epoch(prompts, feats, pids, optimizer, batch_size=6, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert not torch.equal(prompts.cls_ctx, ctx_before)
    assert all(torch.equal(v, text_before[k]) for k, v in prompts.text.state_dict().items())
    assert [p for g in optimizer.param_groups for p in g["params"]] == [prompts.cls_ctx]


def test_learn_prompts_follows_the_schedule_and_separates_identities(prompts, one_thread):
    # image features of 6 identities around 6 random directions: stage 1 must find one prompt per direction
    gen = torch.Generator().manual_seed(2)
    centres = torch.randn(6, 16, generator=gen) * 3
    pids = torch.arange(6).repeat_interleave(8)
    feats = centres[pids] + 0.3 * torch.randn(48, 16, generator=gen)
    seen = []
    config = Stage1Config(epochs=20, batch_size=48, lr=1e-2, warmup_epochs=5, warmup_lr_init=1e-4, lr_min=1e-5)
    history = learn_prompts(prompts, feats, pids, config, on_epoch=lambda e, loss, lr: seen.append((e, lr)))
    assert len(history) == 20 and history[-1] < 0.5 * history[0]
    # warm-up from warmup_lr_init (epoch e < 5 at init + e * (lr - init) / 5), then cosine down to lr_min
    assert seen[0][1] == pytest.approx(1e-4 + (1e-2 - 1e-4) / 5)
    assert seen[4][1] > seen[10][1] > seen[18][1] > 1e-5 and seen[-1][1] == pytest.approx(1e-5)
    text_features = prompts.all_features()
    accuracy = ((feats @ text_features.t()).argmax(1) == pids).float().mean()
    assert accuracy > 0.9


def test_learn_prompts_refuses_labels_beyond_the_prompts(prompts):
    with pytest.raises(InputError, match=r"\[0, 6\)"):
        learn_prompts(prompts, torch.randn(4, 16), torch.tensor([0, 1, 6, 6]), Stage1Config(epochs=1))


def test_extract_image_features_keeps_the_order_and_labels():
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i + 1]), torch.zeros(2), torch.zeros(2))
               for i in range(3)]
    feats, pids = extract_image_features(lambda x, cams, views: x[:, :2].half(), batches)
    assert feats.dtype == torch.float32 and feats.shape == (6, 2)
    assert feats[:, 0].tolist() == [0, 0, 1, 1, 2, 2] and pids.tolist() == [0, 1, 1, 2, 2, 3]


# --- CLIP-ReID checkpoints in full ----------------------------------------------------------------------

def _clip_reid_file(tmp_path, num_classes=6):
    torch.manual_seed(3)
    visual = ClipVisual(img_size=(64, 32), stride_size=12, camera_num=3, **TINY)
    randomise_norms_and_biases(visual, seed=3)
    text = ClipText(**{**SMALL_TEXT, "output_dim": TINY["output_dim"]})
    randomise_norms_and_biases(text, seed=4)
    learner = PromptLearner(text, num_classes=num_classes)
    with torch.no_grad():
        learner.cls_ctx.normal_(std=0.5)
    ckpt = {f"image_encoder.{k}": v for k, v in visual.state_dict().items() if k != "cv_embed"}
    ckpt["cv_embed"] = visual.cv_embed.detach().clone()
    ckpt.update({f"text_encoder.{k}": v for k, v in text.state_dict().items() if k != "token_embedding.weight"})
    ckpt.update({f"prompt_learner.{k}": v for k, v in learner.state_dict().items() if not k.startswith("text.")})
    for name, width in (("bottleneck", 64), ("bottleneck_proj", 32)):
        ckpt.update({f"{name}.{k}": v for k, v in nn.BatchNorm1d(width).state_dict().items()})
    ckpt["classifier.weight"] = torch.randn(num_classes, 64)
    ckpt["classifier_proj.weight"] = torch.randn(num_classes, 32)
    path = tmp_path / "ViT-B-16_60.pth"
    torch.save(ckpt, path)
    return path, visual, learner


def test_load_clipreid_checkpoint_gives_both_halves(tmp_path):
    path, visual, learner = _clip_reid_file(tmp_path)
    image = ClipVisual(img_size=(64, 32), stride_size=12, camera_num=3, **TINY)
    text = ClipText(**{**SMALL_TEXT, "output_dim": TINY["output_dim"]})
    prompts = PromptLearner(text, num_classes=6)
    image_report, text_report = load_clipreid_checkpoint(path, image, prompts)
    assert image_report.kind == text_report.kind == "clip-reid"
    for k, v in visual.state_dict().items():
        torch.testing.assert_close(image.state_dict()[k], v, rtol=0, atol=0, msg=k)
    for k, v in learner.state_dict().items():
        if k != "text.token_embedding.weight":
            torch.testing.assert_close(prompts.state_dict()[k], v, rtol=0, atol=0, msg=k)
    pids = torch.tensor([5, 0])
    with torch.no_grad():
        torch.testing.assert_close(prompts(pids), learner.eval()(pids))


def test_load_clipreid_checkpoint_is_all_or_nothing(tmp_path):
    path, _, _ = _clip_reid_file(tmp_path)
    image = ClipVisual(img_size=(64, 32), stride_size=12, camera_num=3, **TINY)
    prompts = PromptLearner(ClipText(**{**SMALL_TEXT, "output_dim": TINY["output_dim"]}), num_classes=7)
    before = {k: v.clone() for k, v in image.state_dict().items()}
    with pytest.raises(CheckpointError, match="num_classes=6"):
        load_clipreid_checkpoint(path, image, prompts)
    assert all(torch.equal(v, before[k]) for k, v in image.state_dict().items())


def test_a_gradient_scaler_changes_nothing_but_the_scale(one_thread):
    # CLIP-ReID runs stage 1 under fp16 autocast with a GradScaler; the scaler's power-of-two scale is undone
    # exactly before Adam's step, so the prompts learn the same
    gen = torch.Generator().manual_seed(5)
    pids = torch.arange(6).repeat_interleave(4)
    feats = torch.randn(24, 16, generator=gen)
    config = Stage1Config(epochs=3, batch_size=8, lr=1e-2)
    learned = []
    for scaler in (None, torch.amp.GradScaler("cpu")):
        torch.manual_seed(0)
        text = ClipText(**SMALL_TEXT)
        randomise_norms_and_biases(text)
        prompts = PromptLearner(text, num_classes=6)
        learn_prompts(prompts, feats, pids, config, scaler=scaler)
        learned.append(prompts.cls_ctx.detach())
    torch.testing.assert_close(learned[1], learned[0], rtol=0, atol=1e-7)
