"""CLIP-ReID's two training stages as functions a training loop calls, and its checkpoints in full.

**Stage 1** learns one prompt per identity (:class:`~reid_ms.PromptLearner`'s ``cls_ctx``) with the text
and image encoders frozen: the image features of the training set are extracted once
(:func:`extract_image_features`) and cached; each step draws a batch of them, encodes the batch's
identities' prompts and minimises :class:`~reid_ms.losses.SupConLoss` both ways (image-to-text and
text-to-image). :func:`learn_prompts` runs CLIP-ReID's schedule: Adam 3.5e-4 (weight decay 1e-4) over
``cls_ctx`` only, warm-up cosine over 120 epochs (5 warm-up epochs from 1e-5, down to 1e-6), batch 64.

**Stage 2** fine-tunes the image encoder with the ID and triplet losses plus :func:`image_to_text_loss`:
label-smoothed cross-entropy of ``image_feature @ text_features.T`` against every identity's text feature,
computed once after stage 1 (:meth:`~reid_ms.PromptLearner.all_features`); the text side stays frozen.

:func:`load_clipreid_checkpoint` loads both halves of a CLIP-ReID-trained file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.clip_text import PromptLearner
from reid_ms.errors import CheckpointError, ConfigError, InputError
from reid_ms.losses import CrossEntropyLabelSmooth, SupConLoss
from reid_ms.optim import build_scheduler
from reid_ms.weights._common import LoadReport, cast_like, load_all_or_nothing, memory_budget
from reid_ms.weights._io import read_checkpoint
from reid_ms.weights.clip import clip_checkpoint_filter
from reid_ms.weights.clip_text import clip_text_checkpoint_filter

logger = logging.getLogger("reid_ms.clipreid")

__all__ = ["Stage1Config", "extract_image_features", "stage1_optimizer", "stage1_epoch", "learn_prompts",
           "image_to_text_loss", "load_clipreid_checkpoint"]


@dataclass(frozen=True)
class Stage1Config:
    """CLIP-ReID's stage-1 schedule (``configs/person/vit_clipreid.yml``, ``SOLVER.STAGE1``)."""

    epochs: int = 120
    batch_size: int = 64
    lr: float = 3.5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    warmup_lr_init: float = 1e-5
    lr_min: float = 1e-6

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Stage1Config: {key} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"Stage1Config: lr must be > 0, got {self.lr!r}")


@torch.no_grad()
def extract_image_features(
    encode: Callable[..., torch.Tensor], batches: Iterable[Any], device: torch.device | str = "cpu",
    autocast: Optional[Callable[[], Any]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen image features of a whole training set, once: ``(features [N, D] float32, pids [N])``.

    Args:
        encode: ``encode(images, cams, views) -> [B, D]``, the image feature stage 1 aligns prompts with
            (CLIP-ReID: the projected CLS of the image encoder); called without gradients.
        batches: ``(images, pids, cams, views)`` tuples, e.g. a DataLoader over
            :class:`reid_ms.data.ImageDataset` with the evaluation transform.
        device: where the images go; the features are kept there.
        autocast: a context factory for mixed precision (the features are stored as float32 either way).
    """
    feats, labels = [], []
    for images, pids, cams, views in batches:
        images = images.to(device, non_blocking=True)
        if autocast is None:
            out = encode(images, cams, views)
        else:
            with autocast():
                out = encode(images, cams, views)
        feats.append(out.float())
        labels.append(torch.as_tensor(pids).to(device))
    if not feats:
        raise InputError("extract_image_features got no batches; the training set is empty")
    return torch.cat(feats), torch.cat(labels).long()


def stage1_optimizer(prompts: PromptLearner, config: Stage1Config = Stage1Config()) -> torch.optim.Adam:
    """Adam over ``prompts.cls_ctx`` alone (lr, weight decay of ``config``); freezes the text tower."""
    prompts.text.requires_grad_(False)
    prompts.cls_ctx.requires_grad_(True)
    return torch.optim.Adam([{"params": [prompts.cls_ctx], "lr": config.lr, "weight_decay": config.weight_decay}],
                            lr=config.lr)


def stage1_epoch(
    prompts: PromptLearner, features: torch.Tensor, pids: torch.Tensor, optimizer: torch.optim.Optimizer,
    batch_size: int, generator: Optional[torch.Generator] = None, autocast: Optional[Callable[[], Any]] = None,
    supcon: Optional[nn.Module] = None, scaler: Optional[torch.amp.GradScaler] = None,
) -> float:
    """One pass over the cached image features in a random order: the mean stage-1 loss of its steps.

    Each step takes ``batch_size`` features (the last step the rest), encodes the prompts of their
    identities and minimises ``SupCon(image, text) + SupCon(text, image)`` with the batch's labels on
    both sides (CLIP-ReID's ``loss_i2t + loss_t2i``).

    Args:
        features: ``[N, D]`` cached image features; ``pids``: ``[N]`` their identities.
        generator: draws the order (CPU generator); ``None`` uses the global one.
        scaler: a gradient scaler for fp16 autocast (CLIP-ReID trains stage 1 with one).
    """
    if features.dim() != 2 or pids.shape != features.shape[:1]:
        raise InputError(f"stage1_epoch expects features [N, D] and pids [N], got {tuple(features.shape)} and "
                         f"{tuple(pids.shape)}")
    supcon = SupConLoss() if supcon is None else supcon
    order = torch.randperm(len(pids), generator=generator).to(features.device)
    prompts.train()
    total, steps = 0.0, 0
    for idx in order.split(batch_size):
        image, target = features[idx], pids[idx]
        if autocast is None:
            text = prompts(target)
        else:
            with autocast():
                text = prompts(target)
        text = text.float()
        loss = supcon(image, text, target, target) + supcon(text, image, target, target)
        if not torch.isfinite(loss):
            raise InputError(f"stage 1: the loss is {loss.item()} at step {steps + 1}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        total += loss.item()
        steps += 1
    return total / steps


def learn_prompts(
    prompts: PromptLearner, features: torch.Tensor, pids: torch.Tensor, config: Stage1Config = Stage1Config(),
    seed: int = 0, autocast: Optional[Callable[[], Any]] = None,
    on_epoch: Optional[Callable[[int, float, float], None]] = None, scaler: Optional[torch.amp.GradScaler] = None,
) -> list[float]:
    """CLIP-ReID's stage 1 over cached image features: the mean loss of every epoch.

    ``scheduler.step(epoch)`` at each epoch's start (1-based), as CLIP-ReID; epoch ``e`` draws its order
    from ``seed + e``, so a run is reproducible. ``on_epoch(epoch, loss, lr)`` is called after each epoch.
    """
    ids = pids.unique()
    if int(ids.min()) < 0 or int(ids.max()) >= prompts.num_classes:
        raise InputError(f"stage 1: identity labels must lie in [0, {prompts.num_classes}) (the PromptLearner's "
                         f"num_classes), got values in [{int(ids.min())}, {int(ids.max())}]")
    optimizer = stage1_optimizer(prompts, config)
    scheduler = build_scheduler(optimizer, "cosine", epochs=config.epochs, warmup_epochs=config.warmup_epochs,
                                lr_min=config.lr_min, warmup_lr_init=config.warmup_lr_init)
    supcon = SupConLoss()
    history = []
    for epoch in range(1, config.epochs + 1):
        scheduler.step(epoch)
        lr = optimizer.param_groups[0]["lr"]
        loss = stage1_epoch(prompts, features, pids, optimizer, config.batch_size,
                            torch.Generator().manual_seed(seed + epoch), autocast, supcon, scaler)
        history.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, loss, lr)
        if epoch == 1 or epoch == config.epochs or epoch % 10 == 0:
            logger.info("stage 1, epoch %d/%d: loss %.4f, lr %.2e", epoch, config.epochs, loss, lr)
    prompts.eval()
    return history


def image_to_text_loss(image_features: torch.Tensor, text_features: torch.Tensor, pids: torch.Tensor,
                       epsilon: float = 0.1) -> torch.Tensor:
    """CLIP-ReID's stage-2 image-to-text loss: label-smoothed cross-entropy of ``image @ text.T``.

    Args:
        image_features: ``[B, D]`` (CLIP-ReID: the projected CLS, unnormalised).
        text_features: ``[C, D]``, every identity's prompt feature (fixed in stage 2).
        pids: ``[B]`` identity labels in ``[0, C)``.
        epsilon: label smoothing (CLIP-ReID's 0.1).
    """
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise InputError(f"image_to_text_loss expects image features [B, D] and text features [C, D] of the same "
                         f"width, got {tuple(image_features.shape)} and {tuple(text_features.shape)}")
    logits = image_features @ text_features.to(image_features.dtype).t()
    return CrossEntropyLabelSmooth(num_classes=text_features.shape[0], epsilon=epsilon)(logits, pids)


def load_clipreid_checkpoint(path: str | os.PathLike, image: nn.Module,
                             prompts: PromptLearner) -> tuple[LoadReport, LoadReport]:
    """Load both halves of a CLIP-ReID-trained checkpoint, all or nothing: ``(image report, text report)``.

    Args:
        path: the file CLIP-ReID wrote (``ViT-B-16_60.pth``: ``image_encoder.*``, ``cv_embed``,
            ``text_encoder.*``, ``prompt_learner.*``, heads).
        image: a :class:`~reid_ms.ClipVisual`, or a model from :func:`reid_ms.build` with one as its
            ``backbone`` (only the backbone is loaded here; ``build(name, pretrained=path)`` also fills
            the head).
        prompts: a :class:`~reid_ms.PromptLearner` built with the run's ``num_classes`` and template; it
            gets the text encoder and the learned ``cls_ctx`` (its token embedding stays its own: CLIP-ReID
            files hold none).

    Both halves are checked before either is copied: a failure leaves both models unchanged.
    """
    visual = image if isinstance(image, ClipVisual) else getattr(image, "backbone", None)
    if not isinstance(visual, ClipVisual):
        raise ConfigError(f"load_clipreid_checkpoint takes a reid_ms.ClipVisual or a model built on one, got "
                          f"{type(image).__name__}")
    if not isinstance(prompts, PromptLearner):
        raise ConfigError(f"load_clipreid_checkpoint takes a reid_ms.PromptLearner, got {type(prompts).__name__}")
    path = os.fspath(path)
    obj, fmt = read_checkpoint(path, memory_budget(visual) + memory_budget(prompts))
    image_state, image_report, _ = clip_checkpoint_filter(obj, visual, path, fmt)
    text_state, text_report = clip_text_checkpoint_filter(obj, prompts, path, fmt)
    if image_report.kind != "clip-reid" or text_report.kind != "clip-reid":
        raise ConfigError(f"{path!r} is a {image_report.kind} checkpoint, not one trained by CLIP-ReID; load it with "
                          f"reid_ms.load_clip_weights into each half")
    if "cls_ctx" in text_report.kept_init:
        raise ConfigError(f"{path!r} holds no learned prompts (prompt_learner.cls_ctx)")
    # both halves are checked before the first copy, so a failure leaves both models unchanged
    for model, state, report in ((visual, image_state, image_report), (prompts, text_state, text_report)):
        _check_fits(model, state, report)
    load_all_or_nothing(visual, image_state, image_report)
    load_all_or_nothing(prompts, text_state, text_report)
    return image_report, text_report


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> None:
    """What :func:`load_all_or_nothing` would refuse (keys, shapes, dtypes, finite values), without copying."""
    target = model.state_dict()
    bad = sorted(set(target) ^ set(state)) or [k for k in target if tuple(state[k].shape) != tuple(target[k].shape)]
    if bad:
        raise CheckpointError(f"{report.path!r} ({report.kind}) does not fit {type(model).__name__} ({bad[:4]}); "
                              f"nothing was loaded")
    cast_like(state, target, report.path, report.kind)
