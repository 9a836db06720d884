"""Loading TransReID JPM checkpoints and ViT weights into :class:`reid_ms.JPMReIDModel`.

A TransReID JPM checkpoint holds the full ViT under ``base.`` (its last block and ``norm`` unused, in
TransReID as in the model's backbone, which keeps them so the keys match), the two branches
``b1.{0,1}.*`` / ``b2.{0,1}.*`` (block, norm), the BNNecks ``bottleneck``, ``bottleneck_1`` ...
``bottleneck_4`` and the bias-free classifiers ``classifier``, ``classifier_1`` ... ``classifier_4``.
Any other ViT checkpoint :func:`~reid_ms.load_vit_weights` reads (ImageNet, TransReID without JPM)
fills both branches with its last block and final norm, as TransReID does when it starts a JPM model
from ImageNet weights.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import CheckpointError, ConfigError
from reid_ms.heads.multibranch import MultiBranchBNNeckHead
from reid_ms.weights._common import LoadReport, load_file
from reid_ms.weights._io import flatten_state_dict, strip_prefix
from reid_ms.weights.built import saved_model
from reid_ms.weights.vit import vit_checkpoint_filter

logger = logging.getLogger("reid_ms.weights")

_BRANCH = re.compile(r"b[12]\.")
_HEAD = re.compile(r"(bottleneck|classifier)(_\d+)?\.")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def _head_state(heads: dict[str, torch.Tensor], head: MultiBranchBNNeckHead, path: str,
                report: LoadReport) -> dict[str, torch.Tensor]:
    """TransReID's per-branch BNNecks and classifiers -> the model's head keys, where they fit."""
    k, d = head.branches, head.branch_dim
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    suffixes = [""] + [f"_{i}" for i in range(1, k)]  # TransReID's bottleneck, bottleneck_1, ...
    bn_keys = [[f"bottleneck{sfx}.{f}" for f in _BN_FIELDS] for sfx in suffixes]
    if all(key in heads for keys in bn_keys for key in keys):
        parts = [heads[key] for keys in bn_keys for key in keys]
        if any(not p.is_floating_point() for p in parts):
            raise CheckpointError(f"{path!r} ({report.kind}): a BNNeck tensor (bottleneck*) is not floating "
                                  f"point; the file is damaged")
        if all(p.shape == (d,) for p in parts):
            for j, f in enumerate(_BN_FIELDS):
                out[f"head.bottleneck.{f}"] = torch.cat([heads[bn_keys[i][j]].float() for i in range(k)])
            if "bottleneck.num_batches_tracked" in heads:
                out["head.bottleneck.num_batches_tracked"] = heads["bottleneck.num_batches_tracked"]
            used.update(key for key in heads if key.startswith("bottleneck"))
        else:
            logger.info("%s: the trained BNNecks are not %d wide; the head keeps its initialisation", path, d)
    elif any(key.startswith("bottleneck") for key in heads):
        logger.info("%s: the file has no BNNeck for each of the %d branches (bottleneck, bottleneck_1, ...); "
                    "the head keeps its initialisation", path, k)
    cls_keys = [f"classifier{sfx}.weight" for sfx in suffixes]
    if head.classifiers is not None and all(key in heads and heads[key].shape == (head.num_classes, d)
                                            for key in cls_keys):
        out.update({f"head.classifiers.{i}.weight": heads[key] for i, key in enumerate(cls_keys)})
        used.update(cls_keys)
    for key in heads:
        if key not in used:
            report.ignored[key] = (f"TransReID re-ID head that does not fit this model's {k} branches x {d} wide, "
                                   f"num_classes={head.num_classes}")
    return out


def _fill_split_layout(state: dict[str, torch.Tensor], report: LoadReport,
                       depth: int) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A JPM model saved by reid_ms when its backbone stopped short (no ``backbone.blocks.{last}`` nor
    ``backbone.norm``): those unused tensors are filled from the global branch ``jpm.b1``, as TransReID
    starts ``b1`` from them."""
    last = f"backbone.blocks.{depth - 1}."
    if any(k.startswith((last, "backbone.norm.")) for k in state) or not any(k.startswith("jpm.b1.") for k in state):
        return state, report
    fill = {(last if k.startswith("jpm.b1.0.") else "backbone.norm.") + k[len("jpm.b1.0."):]: v
            for k, v in state.items() if k.startswith(("jpm.b1.0.", "jpm.b1.1."))}
    report.kind = "reid_ms-split-jpm"
    logger.info("%s: a JPM model saved without the backbone's unused last block and final norm; %s* and "
                "backbone.norm.* are filled from jpm.b1", report.path, last)
    return {**state, **fill}, report


def jpm_checkpoint_filter(checkpoint: Mapping[str, Any], model: nn.Module, path: str = "<state dict>",
                          fmt: str = "state dict") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map a TransReID JPM checkpoint, or any ViT checkpoint, to ``model``'s keys without touching ``model``.

    ``checkpoint`` is what :func:`reid_ms.weights.read_checkpoint` returns (wrappers and a ``module.``
    prefix allowed); ``model`` a :class:`~reid_ms.JPMReIDModel`. A saved reid_ms JPM model loads as it is;
    one saved before the backbone kept its (unused) last block and final norm gets them from ``jpm.b1``
    (``report.kind == "reid_ms-split-jpm"``).

    Returns:
        ``(state, report)``: ``state`` names every tensor of ``model.state_dict()``; what the file lacks
        (the multi-scale neck, a head that does not fit, the camera table of ImageNet weights) is the
        model's own and listed in ``report.kept_init``.
    """
    vit, head = getattr(model, "backbone", None), getattr(model, "head", None)
    if not (isinstance(vit, VitTrans) and isinstance(head, MultiBranchBNNeckHead) and hasattr(model, "jpm")):
        raise ConfigError(f"load_jpm_weights loads into reid_ms.JPMReIDModel, got {type(model).__name__}; "
                          f"for a plain VitTrans use load_vit_weights")
    state, wrapper = flatten_state_dict(checkpoint, path)
    state, _ = strip_prefix(state)
    saved = saved_model(state, wrapper, model, path, fmt)
    if saved is not None:
        return _fill_split_layout(*saved, len(vit.blocks))
    branches = {k: v for k, v in state.items() if _BRANCH.match(k)}
    heads = {k: v for k, v in state.items() if _HEAD.match(k)}
    rest = {k: v for k, v in state.items() if k not in branches and k not in heads}
    backbone, report, _ = vit_checkpoint_filter(rest, vit, path, fmt)
    report.ignored = {**wrapper, **report.ignored}
    last = len(vit.blocks) - 1
    last_block = {k: v for k, v in backbone.items() if k.startswith((f"blocks.{last}.", "norm."))}
    if len({k.split(".")[0] for k in last_block}) < 2:
        depth = 1 + max((int(m.group(1)) for m in map(re.compile(r"blocks\.(\d+)\.").match, backbone) if m),
                        default=-1)
        raise CheckpointError(f"{path!r} ({report.kind}) has no block {last} plus final norm (it holds {depth} "
                              f"blocks); build the model with depth={depth} or load a checkpoint of this depth")
    out = {f"backbone.{k}": v for k, v in backbone.items()}
    if branches:
        report.kind = "transreid-jpm"
        out.update({f"jpm.{k}": v for k, v in branches.items()})
    else:  # as TransReID starts a JPM model: both branches are copies of the last block and final norm
        for k, v in last_block.items():
            sub, name = ("1", k[len("norm."):]) if k.startswith("norm.") else ("0", k[len(f"blocks.{last}."):])
            out.update({f"jpm.{branch}.{sub}.{name}": v for branch in ("b1", "b2")})
    out.update(_head_state(heads, head, path, report))

    report.kept_init = [f"backbone.{k}" for k in report.kept_init]
    for k, v in model.state_dict().items():
        if k not in out and k.startswith(("neck.", "head.")):
            out[k] = v
            report.kept_init.append(k)
    return out, report


def load_jpm_weights(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a TransReID JPM checkpoint or any ViT checkpoint into ``model``, all of it or nothing.

    JPM checkpoints fill the backbone, both branches and, where they fit (same width, ``num_classes``),
    the five BNNecks and classifiers; other ViT checkpoints fill the backbone and copy their last block
    and final norm into both branches. Position tables are resized as by :func:`~reid_ms.load_vit_weights`.

    Returns:
        A :class:`~reid_ms.LoadReport` with model keys (``backbone.*``, ``jpm.*``, ``head.*``).
    """
    return load_file(model, path, lambda obj, file, fmt: jpm_checkpoint_filter(obj, model, file, fmt))
