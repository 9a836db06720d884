"""Training recipes: the hyper-parameters of TransReID's and CLIP-ReID's published runs, and hooks.

A :class:`Recipe` is a frozen dataclass: every field but ``name`` and ``hooks`` can be overridden by
name (``recipe.replace(lr=0.004)``, or ``reid-ms train ... --set lr=0.004``). ``hooks`` extend a
recipe with work of their own (:class:`TrainHook`): CLIP-ReID's text stage, which learns one prompt per
identity before the image encoder is fine-tuned, plugs in there as a hook on the ``clipreid`` recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch

from reid_ms._validate import positive_int
from reid_ms.errors import ConfigError

if TYPE_CHECKING:
    from reid_ms.training.loop import TrainContext

__all__ = ["Recipe", "TrainHook", "RECIPES", "get_recipe"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("cosine", "warmup_multistep")


class TrainHook:
    """Work a recipe adds to the training run; override the methods needed (the defaults do nothing).

    Order in a run: ``load_state_dict`` (when resuming, with what ``state_dict`` returned at the last
    checkpoint), ``before_training`` once, then ``extra_loss`` at every step of every epoch.
    """

    def before_training(self, context: TrainContext) -> None:
        """Runs once before the first epoch of this process (CLIP-ReID's stage 1 learns its prompts here)."""

    def extra_loss(self, context: TrainContext, logits: Any, features: Any, pids: torch.Tensor) -> Optional[torch.Tensor]:
        """A scalar added to the recipe's loss at every step, or ``None``.

        ``logits`` and ``features`` are what the model returns in train mode (tuples for JPM models),
        ``pids`` the batch's identity labels ``[B]``.
        """
        return None

    def state_dict(self) -> dict[str, Any]:
        """What the hook needs to resume, saved in every checkpoint (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


@dataclass(frozen=True)
class Recipe:
    """A training recipe.

    Attributes:
        name: how it is called on the command line (``--recipe``).
        epochs, batch_size, num_instances: the schedule's length and the P x K batch (``batch_size //
            num_instances`` identities with ``num_instances`` images each).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``; ``lr`` is the base learning rate, and
            ``weight_decay``, ``weight_decay_bias``, ``bias_lr_factor``, ``large_fc_lr`` are
            :func:`reid_ms.optim.param_groups`'s rules.
        scheduler: ``"cosine"`` (TransReID's warm-up cosine, ``warmup_epochs``) or ``"warmup_multistep"``
            (CLIP-ReID's: ``milestones``, ``gamma``, ``warmup_factor``, ``warmup_iters`` in epochs).
        id_weight, triplet_weight, label_smoothing, margin: :class:`reid_ms.losses.ReIDLoss`'s
            (``margin=None``: the soft-margin triplet loss).
        camera_embedding, view_embedding: build the camera / view table (SIE) from the data set's
            cameras / views, when it has more than one.
        flip_prob, padding, erase_prob: :func:`reid_ms.data.train_transform`'s augmentation.
        eval_every: evaluate on query / gallery every this many epochs (and after the last one).
        hooks: :class:`TrainHook` objects run with the recipe.
        stage1_epochs, stage1_batch_size, stage1_lr, i2t_weight, text_width, text_layers, text_heads:
            CLIP-ReID's text side (the ``clipreid`` recipe's hook, :mod:`reid_ms.training.clipreid`): the
            prompt-learning stage's length, batch and Adam learning rate, the weight of the image-to-text
            loss, and the text tower's size (CLIP ViT-B/16's: 512 wide, 12 layers, 8 heads).
    """

    name: str
    epochs: int
    batch_size: int
    num_instances: int
    optimizer: str
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    bias_lr_factor: float = 2.0
    large_fc_lr: bool = False
    scheduler: str = "cosine"
    warmup_epochs: int = 5
    milestones: tuple[int, ...] = (30, 50)
    gamma: float = 0.1
    warmup_factor: float = 0.1
    warmup_iters: int = 10
    id_weight: float = 1.0
    triplet_weight: float = 1.0
    label_smoothing: float = 0.0
    margin: Optional[float] = None
    camera_embedding: bool = True
    view_embedding: bool = False
    flip_prob: float = 0.5
    padding: int = 10
    erase_prob: float = 0.5
    eval_every: int = 10
    hooks: tuple[TrainHook, ...] = ()
    stage1_epochs: int = 120
    stage1_batch_size: int = 64
    stage1_lr: float = 3.5e-4
    i2t_weight: float = 1.0
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"recipe {self.name!r}: optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"recipe {self.name!r}: scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        for key in ("epochs", "batch_size", "num_instances", "stage1_epochs", "stage1_batch_size", "text_width",
                    "text_layers", "text_heads"):
            positive_int(getattr(self, key), key, owner=f"recipe {self.name!r}")
        if self.batch_size % self.num_instances:
            raise ConfigError(f"recipe {self.name!r}: batch_size {self.batch_size} is not a multiple of "
                              f"num_instances {self.num_instances} (a batch is whole groups of one identity)")
        if self.batch_size // self.num_instances < 2:
            raise ConfigError(f"recipe {self.name!r}: a batch of {self.batch_size} with {self.num_instances} images "
                              f"per identity holds one identity; the triplet loss needs at least 2")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"recipe {self.name!r}: eval_every must be an int >= 0 (0: only after the last "
                              f"epoch), got {self.eval_every!r}")
        if not all(isinstance(h, TrainHook) for h in self.hooks):
            raise ConfigError(f"recipe {self.name!r}: hooks must be TrainHook objects, got "
                              f"{[type(h).__name__ for h in self.hooks]}")

    @classmethod
    def overridable(cls) -> list[str]:
        """Field names :meth:`replace` accepts."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "hooks")]

    def replace(self, **overrides: Any) -> Recipe:
        """A copy with ``overrides`` applied; numbers are checked against the field's type."""
        allowed = self.overridable()
        for key, value in overrides.items():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
                raise ConfigError(f"recipe {self.name!r} has no setting {key!r}; {hint}settings: {', '.join(allowed)}")
            overrides[key] = _coerce(self.name, key, getattr(self, key), value)
        return dataclasses.replace(self, **overrides)

    def settings(self) -> dict[str, Any]:
        """The overridable fields as JSON values (what ``config.json`` and the checkpoint record)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in
                ((k, getattr(self, k)) for k in ["name", *self.overridable()])}


def _coerce(recipe: str, key: str, default: Any, value: Any) -> Any:
    """``value`` as the type of ``default``; ints stand for floats, lists for tuples, ``None`` for a margin."""
    if key == "margin" and value is None:
        return None
    want = float if key == "margin" else type(default)
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if want is tuple and isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return tuple(value)
    if isinstance(value, want) and not (want is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"recipe {recipe!r}: {key} takes a {want.__name__}"
                      f"{' or None (soft margin)' if key == 'margin' else ''}, got {value!r}")


TRANSREID = Recipe(
    # TransReID's configs/Market/vit_transreid_stride.yml and its defaults: SGD 0.008 with momentum 0.9,
    # batch 64 = 16 ids x 4, 120 epochs of warm-up cosine (5 warm-up epochs), the soft-margin triplet loss
    # (NO_MARGIN) plus cross-entropy without label smoothing, SIE on the cameras.
    name="transreid", epochs=120, batch_size=64, num_instances=4, optimizer="sgd", lr=0.008, momentum=0.9,
    weight_decay=1e-4, weight_decay_bias=1e-4, bias_lr_factor=2.0, scheduler="cosine", warmup_epochs=5,
    id_weight=1.0, triplet_weight=1.0, label_smoothing=0.0, margin=None,
)

CLIPREID = Recipe(
    # CLIP-ReID's stage 2 (configs/person/vit_clipreid.yml, SOLVER.STAGE2): Adam 5e-6, 60 epochs of
    # WarmupMultiStepLR (steps 30/50, gamma 0.1, 10 linear warm-up epochs from 0.1), the label-smoothed
    # ID loss weighted 0.25 and the triplet loss with margin 0.3 (SOLVER.MARGIN). The image-to-text loss
    # and stage 1 belong to the text side and plug in as hooks. That config leaves SIE off (its
    # "+SIE+OLP" variant sets camera_embedding=True and stride_size=12).
    name="clipreid", epochs=60, batch_size=64, num_instances=4, optimizer="adam", lr=5e-6,
    weight_decay=1e-4, weight_decay_bias=1e-4, bias_lr_factor=2.0, scheduler="warmup_multistep",
    milestones=(30, 50), gamma=0.1, warmup_factor=0.1, warmup_iters=10,
    id_weight=0.25, triplet_weight=1.0, label_smoothing=0.1, margin=0.3, camera_embedding=False,
)

# CLIP-ReID's stage 1 and image-to-text loss, as the clipreid recipe's hook. Imported here, below TrainHook
# which it subclasses (the package imports this module first, so the cycle always resolves this way round).
from reid_ms.training.clipreid import ClipReidTextStage  # noqa: E402

CLIPREID = dataclasses.replace(CLIPREID, hooks=(ClipReidTextStage(),))

RECIPES: dict[str, Recipe] = {r.name: r for r in (TRANSREID, CLIPREID)}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """The registered recipe of that name (``"transreid"``, ``"clipreid"``), or ``recipe`` itself."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[recipe]
