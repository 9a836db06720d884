"""``train()``: a recipe run on a re-ID data set, with evaluation, checkpoints, logs and curves.

What makes a resumed run bit-identical to an uninterrupted one (on the CPU): at the start of every
epoch the global generators (torch, NumPy, Python) and the data loader's are seeded from ``(seed,
rank, epoch)``, and the identity sampler reshuffles from ``(seed, epoch)``. An epoch is therefore a
pure function of the state at its start (model, optimizer, scheduler, gradient scaler), which the
epoch-end checkpoint holds. A run killed at any moment, even mid-epoch, restarts the unfinished epoch
from the last checkpoint with the same draws: the same augmentations, batches and dropout masks.
Data loader workers are seeded by PyTorch from the loader's generator (torch, ``random`` and NumPy
in each worker), so this holds with ``workers > 0`` too, for the same number of workers.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from reid_ms import data, losses, optim
from reid_ms._validate import positive_int
from reid_ms.distributed import convert_sync_batchnorm
from reid_ms.errors import ConfigError, InputError
from reid_ms.metrics import evaluate
from reid_ms.models import BuiltModel, MultiModalReIDModel
from reid_ms.models.base import label_inputs
from reid_ms.registry import _part_args, build, get_spec
from reid_ms.training.checkpoint import (
    atomic_write, load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_jsonl,
)
from reid_ms.training.curves import plot_curves
from reid_ms.training.recipes import Recipe, get_recipe

logger = logging.getLogger("reid_ms.training")

__all__ = ["train", "TrainContext", "TrainResult", "DATASETS", "AMP_DTYPES"]

DATASETS = data.DATASETS
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT, CONFIG, METRICS, CURVES = "last.pt", "config.json", "metrics.jsonl", "curves.png"
# Settings a resumed run may change: where things are and how they are shown. Everything else in
# config.json must match the checkpoint's. (Another worker count changes which worker draws which
# augmentation: the run continues correctly, but is no longer bit-identical to an uninterrupted one.)
RESUMABLE = ("root", "out", "workers", "recipe.eval_every", "eval_first", "device", "progress")


@dataclass
class TrainContext:
    """What a :class:`~reid_ms.training.TrainHook` sees of the run.

    Attributes:
        model: the model being trained (not wrapped in DDP), on ``device``.
        dataset: the data set from :func:`reid_ms.data.load_dataset` (``.train``, ``.query``, ``.gallery``).
        recipe: the recipe with the run's overrides applied.
        device, rank, world_size, out: where the run happens and writes.
        autocast: ``autocast()`` is the mixed-precision context of the run (a no-op without ``amp``).
        pretrained: the checkpoint the model was built from (``None``: none), for hooks that build more.
    """

    model: BuiltModel
    dataset: Any
    recipe: Recipe
    device: torch.device
    rank: int
    world_size: int
    out: Path
    autocast: Callable[[], ContextManager[Any]]
    pretrained: Optional[Path] = None


@dataclass
class TrainResult:
    """The trained model (eval mode) and the run's record.

    Attributes:
        model: the trained model, in eval mode, on the run's device.
        history: the rows of ``metrics.jsonl``.
        out: the run folder; ``checkpoint`` is ``out / "last.pt"``.
    """

    model: BuiltModel
    history: list[dict[str, Any]]
    out: Path
    checkpoint: Path


def train(
    name: str, *, dataset: str, root: str | os.PathLike, out: str | os.PathLike,
    pretrained: str | os.PathLike | None = None, recipe: str | Recipe = "transreid",
    epochs: Optional[int] = None, batch_size: Optional[int] = None, num_instances: Optional[int] = None,
    img_size: Optional[Sequence[int]] = None, overrides: Optional[Mapping[str, Any]] = None,
    eval_every: Optional[int] = None, eval_first: bool = False, workers: int = 0, seed: int = 0,
    resume: bool = False, device: Optional[str] = None, amp: Optional[str] = None,
    grad_checkpointing: bool = False, progress: bool = True,
) -> TrainResult:
    """Train the registered model ``name`` on a data set with a recipe; what ``reid-ms train`` runs.

    Writes to ``out``: ``config.json`` (the resolved settings), ``last.pt`` after every epoch
    (``model``, ``epoch``, ``optimizer``, ``scheduler``, ``scaler``, ``sampler``, ``rng``, ``hooks``,
    ``history``, ``config``; readable with ``torch.load(weights_only=True)``), ``metrics.jsonl`` (one
    row per epoch: ``epoch``, ``loss``, ``lr``, ``time_s``, and ``mAP``, ``rank1``, ``rank5``, ``mINP``
    in [0, 1] after an evaluation) and ``curves.png`` (with matplotlib).

    Args:
        name: a registered model (:func:`reid_ms.list_models`).
        dataset: one of :data:`DATASETS`; ``"folder"`` is a Market-1501-named tree
            ``root/{bounding_box_train,query,bounding_box_test}``.
        root: the data set's folder, as :func:`reid_ms.data.load_dataset` reads it.
        out: the run folder (created). Holding a ``last.pt`` already, it is only resumed (``resume``).
        pretrained: a checkpoint for :func:`reid_ms.build` (ImageNet ViT, CLIP, ...).
        recipe: ``"transreid"``, ``"clipreid"`` or a :class:`~reid_ms.training.Recipe`.
        epochs, batch_size, num_instances, eval_every: override the recipe's.
        img_size: ``(H, W)`` of the model and the augmentation (default: the model's).
        overrides: recipe settings (:meth:`Recipe.overridable`, e.g. ``lr``) and :func:`reid_ms.build`
            keywords (e.g. ``stride_size``, ``depth``), told apart by name. ``num_classes`` comes from the
            data; ``camera_num`` / ``view_num`` too unless given here.
        eval_first: also evaluate the untrained model (a row with ``epoch`` 0 and no loss).
        workers: data loader processes. seed: seeds the model's initialisation and every epoch's draws.
        resume: continue from ``out/last.pt`` when it exists (from the start otherwise).
        device: torch device; default ``cuda`` (the local rank's GPU under torchrun) when available.
        amp: ``"bf16"`` or ``"fp16"`` autocast on CUDA (fp16 with a gradient scaler).
        grad_checkpointing: recompute the backbone's blocks in the backward pass to save memory.
        progress: show progress bars.

    Under ``torchrun`` (``WORLD_SIZE > 1``) or inside an initialised process group, the run is
    distributed: BatchNorm layers are synchronised, every rank draws whole identity groups of the
    global batch ``batch_size``, and rank 0 evaluates and writes the files.
    """
    base = get_recipe(recipe)
    recipe_args, build_args = _split_overrides(name, base, dict(overrides or {}))
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("num_instances", num_instances),
                       ("eval_every", eval_every)):
        if value is not None:
            if key in recipe_args:
                raise ConfigError(f"{key} is given twice, as an argument and in the overrides; keep one")
            recipe_args[key] = value
    rec = base.replace(**recipe_args)
    if "num_classes" in build_args:
        raise ConfigError("num_classes comes from the training set (its number of identities); drop it")
    if img_size is not None:
        if "img_size" in build_args:
            raise ConfigError("img_size is given twice, as an argument and in the overrides; keep one")
        build_args["img_size"] = tuple(int(v) for v in img_size)
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(f"amp must be one of {tuple(AMP_DTYPES)} or None, got {amp!r}")
    seed, workers = positive_int(seed, "seed", minimum=0), positive_int(workers, "workers", minimum=0)

    rank, world, dev, own_group = _distributed(device)
    try:
        if amp is not None and dev.type != "cuda":
            raise ConfigError(f"amp={amp!r} (mixed precision) needs a CUDA device; this run is on {dev}. Drop amp "
                              f"on the CPU, where training runs in float32")
        if rec.batch_size % (world * rec.num_instances):
            raise ConfigError(f"batch_size {rec.batch_size} must split into whole identity groups of "
                              f"{rec.num_instances} on each of the {world} processes")
        run = _Run(name, rec, dataset, Path(root), Path(out), pretrained, build_args, eval_first, workers, seed,
                   resume, dev, rank, world, amp, grad_checkpointing, progress)
        return run.fit()
    finally:
        if own_group:
            dist.destroy_process_group()


def _split_overrides(name: str, recipe: Recipe, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``overrides`` as ``(recipe settings, build() keywords)``; a key that is neither is an error."""
    settings = recipe.overridable()
    model_args = sorted({a for args in _part_args(get_spec(name)).values() for a in args})
    unknown = [k for k in overrides if k not in settings and k not in model_args]
    if unknown:
        close = difflib.get_close_matches(unknown[0], settings + model_args, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"unknown setting {unknown[0]!r}; {hint}recipe settings: {', '.join(settings)}; "
                          f"{name} arguments: {', '.join(model_args)}")
    return ({k: v for k, v in overrides.items() if k in settings},
            {k: v for k, v in overrides.items() if k not in settings})


def _distributed(device: Optional[str]) -> tuple[int, int, torch.device, bool]:
    """``(rank, world size, device, whether this call created the process group)``."""
    if device is not None:
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1'): {exc}") from exc
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: no CUDA device is available here; use device='cpu'")
    own_group = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() and device in (None, "cuda") else "gloo")
        own_group = True
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return rank, world, dev, own_group


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"recipe": {"lr": 0.1}}`` -> ``{"recipe.lr": 0.1}``, so a difference names the setting."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _epoch_seed(seed: int, rank: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _to(images: Any, device: torch.device) -> Any:
    if isinstance(images, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in images.items()}
    return images.to(device, non_blocking=True)


class _Run:
    """One training run: builds everything in ``__init__``, trains in :meth:`fit`."""

    def __init__(self, name: str, recipe: Recipe, dataset: str, root: Path, out: Path,
                 pretrained: str | os.PathLike | None, build_args: dict[str, Any], eval_first: bool, workers: int,
                 seed: int, resume: bool, device: torch.device, rank: int, world: int, amp: Optional[str],
                 grad_checkpointing: bool, progress: bool) -> None:
        self.recipe, self.out, self.device, self.rank, self.world = recipe, out, device, rank, world
        self.seed, self.workers, self.eval_first, self.amp = seed, workers, eval_first, amp
        self.progress = progress and rank == 0
        self.checkpoint = out / CHECKPOINT
        state = None
        if self.checkpoint.exists():
            if not resume:
                raise ConfigError(f"{str(out)!r} already holds a run ({CHECKPOINT}); pass resume=True (--resume) to "
                                  f"continue it, or choose another out folder")
            state = load_checkpoint(self.checkpoint)
        elif resume:
            logger.info("%s: no %s yet, starting from the first epoch", out, CHECKPOINT)

        self.data = data.load_dataset(dataset, root)
        self.build_args = dict(build_args)
        if recipe.camera_embedding and "camera_num" not in build_args and self.data.num_train_cams > 1:
            self.build_args["camera_num"] = self.data.num_train_cams
        if recipe.view_embedding and "view_num" not in build_args and self.data.num_train_views > 1:
            self.build_args["view_num"] = self.data.num_train_views

        _seed_all(seed)
        model = build(name, pretrained=pretrained, num_classes=self.data.num_train_pids, **self.build_args)
        multimodal = isinstance(model, MultiModalReIDModel)
        if multimodal != isinstance(self.data.train[0].path, Mapping):
            raise ConfigError(f"{name} is {'a multi-modal' if multimodal else 'a single-image'} model but the "
                              f"{dataset} data set has {'one image' if multimodal else 'several images'} per sample; "
                              f"use {'rgbnt201' if multimodal else 'a model without _rgbnt'}")
        self.config = {
            "model": name, "dataset": dataset, "root": str(root), "out": str(out),
            "pretrained": None if pretrained is None else str(pretrained),
            "build": {k: list(v) if isinstance(v, tuple) else v for k, v in self.build_args.items()},
            "num_classes": self.data.num_train_pids, "recipe": recipe.settings(), "seed": seed,
            "world_size": world, "amp": amp, "grad_checkpointing": grad_checkpointing, "workers": workers,
            "eval_first": eval_first, "device": str(device),
            "progress": progress, "img_size": list(model.backbone.img_size),
        }
        if state is not None:
            old, new = _flat(state["config"]), _flat(json.loads(json.dumps(self.config)))
            diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                    if old.get(k) != new.get(k) and k not in RESUMABLE]
            if diff:
                raise ConfigError(f"{str(self.checkpoint)!r} was trained with other settings ({'; '.join(diff)}); "
                                  f"resume with the same settings, or start a new run in another out folder")

        model.to(device)
        if grad_checkpointing:
            model.backbone.set_grad_checkpointing(True)
        self.model = model
        self.criterion = losses.ReIDLoss(self.data.num_train_pids, id_weight=recipe.id_weight,
                                         triplet_weight=recipe.triplet_weight,
                                         label_smoothing=recipe.label_smoothing, margin=recipe.margin)
        groups = optim.param_groups(model, base_lr=recipe.lr, weight_decay=recipe.weight_decay,
                                    bias_lr_factor=recipe.bias_lr_factor, weight_decay_bias=recipe.weight_decay_bias,
                                    large_fc_lr=recipe.large_fc_lr)
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum) if recipe.optimizer == "sgd"
            else torch.optim.Adam(groups, lr=recipe.lr))
        # metrics.jsonl's "lr" is that of a group at the recipe's lr (not a bias group at bias_lr_factor x)
        self.lr_group = next((i for i, g in enumerate(self.optimizer.param_groups) if g["lr"] == recipe.lr), 0)
        self.scheduler = optim.build_scheduler(
            self.optimizer, recipe.scheduler, epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs,
            milestones=recipe.milestones, gamma=recipe.gamma, warmup_factor=recipe.warmup_factor,
            warmup_iters=recipe.warmup_iters)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        pids = [s.pid for s in self.data.train]
        # with one replica, the plain P x K sampler
        self.sampler = data.DistributedRandomIdentitySampler(pids, recipe.batch_size, recipe.num_instances,
                                                             num_replicas=world, rank=rank, seed=seed)
        img_size = tuple(model.backbone.img_size)
        self.train_set = data.ImageDataset(self.data.train, data.train_transform(
            img_size=img_size, flip_prob=recipe.flip_prob, padding=recipe.padding, erase_prob=recipe.erase_prob))
        self.eval_tf = data.eval_transform(img_size)

        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        if state is not None:
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.sampler.load_state_dict(state["sampler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            for hook, hook_state in zip(recipe.hooks, state.get("hooks", [])):
                hook.load_state_dict(hook_state)
            self.history = list(state["history"])
            self.start_epoch = int(state["epoch"])
            if rank == 0 and "rng" in state:
                set_rng_state(state["rng"])
            logger.info("%s: resuming after epoch %d of %d", self.checkpoint, self.start_epoch, recipe.epochs)

        self.wrapped: nn.Module = model
        if world > 1:
            convert_sync_batchnorm(model)
            self.wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.context = TrainContext(model, self.data, recipe, device, rank, world, out, self.autocast,
                                    None if pretrained is None else Path(pretrained))

    def autocast(self) -> ContextManager[Any]:
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    # -- the run ---------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        recipe = self.recipe
        if self.rank == 0:
            atomic_write(self.out / CONFIG, lambda f: f.write((json.dumps(self.config, indent=2) + "\n").encode()))
            write_jsonl(self.out / METRICS, self.history)
        for hook in recipe.hooks:
            hook.before_training(self.context)
        if self.eval_first and self.start_epoch == 0 and not self.history:
            self.history.append({"epoch": 0, "loss": None, "lr": None, **self._evaluate_all(0)})
        for epoch in range(self.start_epoch + 1, recipe.epochs + 1):
            self._epoch(epoch)
        if self.rank == 0 and self.start_epoch == recipe.epochs:
            logger.info("%s: the run already finished its %d epochs", self.checkpoint, recipe.epochs)
        self.model.eval()
        return TrainResult(self.model, list(self.history), self.out, self.checkpoint)

    def _epoch(self, epoch: int) -> None:
        recipe, device = self.recipe, self.device
        epoch_seed = _epoch_seed(self.seed, self.rank, epoch)
        _seed_all(epoch_seed)
        self.sampler.set_epoch(epoch)
        self.scheduler.step(epoch)
        lr = self.optimizer.param_groups[self.lr_group]["lr"]
        loader = DataLoader(self.train_set, batch_size=recipe.batch_size // self.world, sampler=self.sampler,
                            num_workers=self.workers, drop_last=True, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(epoch_seed))
        if len(loader) == 0:
            raise ConfigError(f"the training set ({len(self.train_set)} images) gives no full batch of "
                              f"{recipe.batch_size // self.world}; lower batch_size")
        self.model.train()
        started = time.perf_counter()
        total = torch.zeros((), dtype=torch.float64, device=device)
        steps = 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{recipe.epochs}", unit="batch", leave=False, disable=not self.progress)
        for images, pids, cams, views in bar:
            pids = pids.to(device, non_blocking=True)
            with self.autocast():
                logits, features = self.wrapped(_to(images, device),
                                                **label_inputs(self.model.backbone, cams, views, device))
                loss = self.criterion(logits, features, pids)
                for hook in recipe.hooks:
                    extra = hook.extra_loss(self.context, logits, features, pids)
                    if extra is not None:
                        loss = loss + extra
            if not torch.isfinite(loss):
                raise InputError(f"epoch {epoch}, step {steps + 1}: the loss is {loss.item()}; lower the learning "
                                 f"rate (lr={recipe.lr:g}) or check the data")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            total += loss.detach().double()
            steps += 1
            if steps % 10 == 0:
                bar.set_postfix(loss=f"{total.item() / steps:.4f}")
        bar.close()
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        row: dict[str, Any] = {"epoch": epoch, "loss": total.item() / steps, "lr": lr,
                               "time_s": round(time.perf_counter() - started, 3)}
        if (recipe.eval_every and epoch % recipe.eval_every == 0) or epoch == recipe.epochs:
            row.update(self._evaluate_all(epoch))
        self.history.append(row)
        if self.rank == 0:
            self._save(epoch)
            if "mAP" in row or epoch == recipe.epochs:
                plot_curves(self.out / CURVES, self.history, title=f"{self.config['model']} on {self.config['dataset']}")
            scores = f", mAP {100 * row['mAP']:.1f} %, rank-1 {100 * row['rank1']:.1f} %" if "mAP" in row else ""
            logger.info("epoch %d/%d: loss %.4f, lr %.2e%s (%.1f s)", epoch, recipe.epochs, row["loss"], lr, scores,
                        row["time_s"])
        if self.world > 1:
            dist.barrier()

    def _save(self, epoch: int) -> None:
        state = {
            "model": self.model.state_dict(), "epoch": epoch, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(), "rng": rng_state(),
            "hooks": [hook.state_dict() for hook in self.recipe.hooks],
            "history": self.history, "config": self.config, "model_name": self.config["model"],
        }
        save_checkpoint(self.checkpoint, state)
        write_jsonl(self.out / METRICS, self.history)

    # -- evaluation ------------------------------------------------------------------------------

    def _evaluate_all(self, epoch: int) -> dict[str, float]:
        """mAP / CMC of query against gallery (rank 0 computes; the others get the numbers)."""
        scores: list[dict[str, float]] = [{}]  # rank 0's, broadcast to the others
        if self.rank == 0:
            qf, q_pids, q_cams = self._features(self.data.query, f"query (epoch {epoch})")
            gf, g_pids, g_cams = self._features(self.data.gallery, f"gallery (epoch {epoch})")
            r = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams, metric="cosine")
            scores = [{"mAP": r.mAP, "rank1": r.rank(1), "rank5": r.rank(5), "mINP": r.mINP}]
        if self.world > 1:
            dist.broadcast_object_list(scores, src=0)
        return scores[0]

    def _features(self, samples: Sequence[Any], desc: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings ``[N, feat_dim]`` (float32, CPU), pids ``[N]`` and cameras ``[N]`` of ``samples``."""
        loader = DataLoader(data.ImageDataset(samples, self.eval_tf), batch_size=self.recipe.batch_size, shuffle=False,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        feats, pids, cams = [], [], []
        self.model.eval()
        with torch.inference_mode():
            for images, pid, cam, view in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not self.progress):
                with self.autocast():
                    emb = self.model(_to(images, self.device),
                                     **label_inputs(self.model.backbone, cam, view, self.device))
                feats.append(emb.float().cpu())
                pids.append(pid)
                cams.append(cam)
        self.model.train()
        return torch.cat(feats), torch.cat(pids), torch.cat(cams)
