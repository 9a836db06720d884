"""CLIP-ReID's text side in ``reid-ms train --recipe clipreid``: stage 1 before the first epoch, the
image-to-text loss at every step of stage 2.

Before the first epoch, :class:`ClipReidTextStage` builds CLIP's text tower (``text_width`` /
``text_layers`` / ``text_heads``, output as wide as the image encoder's projection), loads its half of
``--pretrained`` when given, makes a :class:`~reid_ms.PromptLearner` with the data set's template (vehicle
or person), extracts the training set's image features once with the untrained image side (evaluation
transform, no gradients), learns the prompts (:func:`reid_ms.clipreid.learn_prompts`; ``stage1_epochs``,
``stage1_batch_size``, ``stage1_lr``) and keeps every identity's text feature. Stage 1's losses go to
``OUT/stage1.jsonl`` (and ``OUT/stage1_curves.png``).

At every step, the loss gains ``i2t_weight * image_to_text_loss(feature, text_features, pids)``. The image
feature is the one the head receives (CLIP-ReID's projected CLS; with the multi-scale neck, the CLS with
its context) when it is as wide as the text features, else the backbone's projected CLS (a model with a
width adapter); stage 1 used the same one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from reid_ms import data
from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.clip_text import ClipText, PromptLearner, template_for
from reid_ms.clipreid import Stage1Config, extract_image_features, image_to_text_loss, learn_prompts
from reid_ms.errors import ConfigError
from reid_ms.models.base import BuiltModel, label_inputs
from reid_ms.training.checkpoint import write_jsonl
from reid_ms.training.curves import plot_curves
from reid_ms.training.recipes import TrainHook
from reid_ms.weights.clip import load_clip_weights

if TYPE_CHECKING:
    from reid_ms.training.loop import TrainContext

logger = logging.getLogger("reid_ms.training")

__all__ = ["ClipReidTextStage"]


class ClipReidTextStage(TrainHook):
    """The ``clipreid`` recipe's hook: stage 1 in :meth:`before_training`, the image-to-text loss in
    :meth:`extra_loss` (see the module docstring). Its state (``cls_ctx``, the text features and stage 1's
    losses) is saved in every checkpoint, so a resumed run does not learn the prompts again."""

    def __init__(self) -> None:
        self.text_features: Optional[torch.Tensor] = None
        self.cls_ctx: Optional[torch.Tensor] = None
        self.stage1_history: list[dict[str, Any]] = []
        self._resumed: Optional[torch.Tensor] = None  # the text features of a resumed run's checkpoint
        self._backbone_cls: Optional[torch.Tensor] = None
        self._handle: Any = None

    # -- stage 1 -------------------------------------------------------------------------------------

    def before_training(self, context: TrainContext) -> None:
        recipe, model, device = context.recipe, context.model, context.device
        backbone = model.backbone
        if not isinstance(backbone, ClipVisual):
            raise ConfigError(f"the clipreid recipe trains a CLIP image encoder with one feature per image "
                              f"(clip_b16, clip_b16_ms, clip_b16_adapt_ms, ...); this model is a "
                              f"{type(model).__name__} on a {type(backbone).__name__}")
        text_dim = backbone.output_dim
        self._watch_backbone(model, text_dim)
        if self._resumed is not None:
            self.text_features, self._resumed = self._resumed.to(device), None
            logger.info("clipreid: the prompts of the resumed run are kept (stage 1 is not run again)")
            return
        text = ClipText(width=recipe.text_width, layers=recipe.text_layers, heads=recipe.text_heads,
                        output_dim=text_dim)
        if context.pretrained is not None:
            logger.info("clipreid: %s", load_clip_weights(text, context.pretrained))
        prompts = PromptLearner(text, num_classes=context.dataset.num_train_pids,
                                template=template_for(context.dataset.name)).to(device)
        feats, pids = self._image_features(context, text_dim)
        config = Stage1Config(epochs=recipe.stage1_epochs, batch_size=recipe.stage1_batch_size, lr=recipe.stage1_lr)
        rows: list[dict[str, Any]] = []
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the run's seeded generator: a repeatable order
        amp = context.autocast()
        fp16 = isinstance(amp, torch.autocast) and amp.fast_dtype == torch.float16
        learn_prompts(prompts, feats, pids, config, seed=seed, autocast=context.autocast,
                      on_epoch=lambda e, loss, lr: rows.append({"epoch": e, "loss": loss, "lr": lr}),
                      scaler=torch.amp.GradScaler(device.type) if fp16 else None)
        self.stage1_history = rows
        self.cls_ctx = prompts.cls_ctx.detach().clone()
        with context.autocast():
            text_features = prompts.all_features(batch_size=config.batch_size).float()
        if context.world_size > 1:  # every rank trains against rank 0's prompts
            dist.broadcast(text_features, src=0)
        self.text_features = text_features
        if context.rank == 0:
            write_jsonl(context.out / "stage1.jsonl", rows)
            plot_curves(context.out / "stage1_curves.png", rows, title="CLIP-ReID stage 1: prompt learning")
        logger.info("clipreid: stage 1 done, %d epochs, loss %.4f -> %.4f", len(rows), rows[0]["loss"],
                    rows[-1]["loss"])

    def _watch_backbone(self, model: BuiltModel, text_dim: int) -> None:
        """Keep the backbone's projected CLS of each step when the head's feature is not text-wide."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if model.feat_dim != text_dim:
            def keep(module: Any, args: Any, out: torch.Tensor) -> None:
                self._backbone_cls = out[:, 0]
            self._handle = model.backbone.register_forward_hook(keep)

    def _image_features(self, context: TrainContext, text_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        model, device = context.model, context.device
        backbone = model.backbone
        loader = DataLoader(data.ImageDataset(context.dataset.train, data.eval_transform(tuple(backbone.img_size))),
                            batch_size=context.recipe.stage1_batch_size, shuffle=False,
                            pin_memory=device.type == "cuda")

        def encode(images: torch.Tensor, cams: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
            labels = label_inputs(backbone, cams, views, device)
            if model.feat_dim == text_dim:
                return model.forward_head(model.forward_features(images, **labels), pre_logits=True)
            return backbone(images, **labels)[:, 0]

        was_training = model.training
        model.eval()
        try:
            return extract_image_features(encode, loader, device, context.autocast)
        finally:
            model.train(was_training)

    # -- stage 2 -------------------------------------------------------------------------------------

    def extra_loss(self, context: TrainContext, logits: Any, features: Any, pids: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor):
            raise ConfigError("the clipreid recipe's image-to-text loss takes one feature per image; this model "
                              "returns several (a JPM model)")
        image = features if self._handle is None else self._backbone_cls
        assert image is not None and self.text_features is not None  # by the forward hook and before_training
        return context.recipe.i2t_weight * image_to_text_loss(image.float(), self.text_features, pids)

    # -- resume --------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.text_features is None or self.cls_ctx is None:
            return {}
        return {"text_features": self.text_features.cpu(), "cls_ctx": self.cls_ctx.cpu(),
                "stage1": self.stage1_history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.text_features = self._resumed = state["text_features"]
        self.cls_ctx = state["cls_ctx"]
        self.stage1_history = list(state["stage1"])

