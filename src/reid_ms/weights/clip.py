"""Loading CLIP checkpoints into :class:`reid_ms.ClipVisual`.

Recognised from their keys, never from the file name: OpenAI's TorchScript ``ViT-B-16.pt`` and
OpenAI-layout state dicts (``visual.*`` beside the text tower), open_clip training checkpoints (under
``state_dict``, keys prefixed ``module.``), bare visual state dicts (``conv1.weight``,
``class_embedding``, ...) and checkpoints trained by CLIP-ReID (``image_encoder.*`` plus the camera/view
table ``cv_embed``). :func:`clip_checkpoint_filter` maps any of them to the model's keys;
:func:`load_clip_weights` then loads all of it or nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.clip_text import ClipText, PromptLearner
from reid_ms.errors import CheckpointError, ConfigError
from reid_ms.weights._common import (LoadReport, check_declared, fit_position_grid, fit_side_table, load_file,
                                     memory_budget)
from reid_ms.weights._io import flatten_state_dict, strip_prefix
from reid_ms.weights.clip_text import load_clip_text_weights

# Entries of an OpenAI / open_clip model outside ``visual.``: the text tower, the contrastive head and
# OpenAI's integer metadata. None of them is part of the image encoder.
_TEXT_TOWER = ("transformer.", "token_embedding.", "ln_final.")
_CLIP_HEAD = ("positional_embedding", "text_projection", "logit_scale", "logit_bias", "attn_mask")
_METADATA = ("input_resolution", "context_length", "vocab_size")

# What a CLIP-ReID model holds beside its image encoder and camera table.
_CLIP_REID_HEADS = {
    "bottleneck": "CLIP-ReID BNNeck",
    "classifier": "CLIP-ReID identity classifier",
    "prompt_learner": "CLIP-ReID learned text prompts",
    "text_encoder": "CLIP-ReID text encoder",
}

_BLOCK_INDEX = re.compile(r"^transformer\.resblocks\.(\d+)\.")


def _is_vit(keys: list[str]) -> bool:
    for k in keys:
        k = k[len("base."):] if k.startswith("base.") else k
        if k in ("cls_token", "pos_embed", "sie_embed") or k.startswith(("blocks.", "patch_embed.")):
            return True
    return False


def _check_architecture(state: dict[str, torch.Tensor], model: ClipVisual, path: str, kind: str) -> None:
    """Name the builder arguments when the file's encoder has another width, patch, depth or output size."""
    conv, proj = state.get("conv1.weight"), state.get("proj")
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_INDEX.match(k))}
    layers = max(blocks) + 1 if blocks else 0
    found: dict[str, Any] = {}
    if conv is not None and conv.dim() == 4:
        found.update(width=conv.shape[0], in_chans=conv.shape[1], patch_size=tuple(conv.shape[2:]))
    if proj is not None and proj.dim() == 2:
        found["output_dim"] = proj.shape[1]
    if layers:
        found["layers"] = layers
    built = {"width": model.width, "in_chans": model.in_chans, "patch_size": tuple(model.patch_size),
             "output_dim": model.output_dim, "layers": model.layers}
    wrong = {k: v for k, v in found.items() if v != built[k]}
    if wrong:
        want = ", ".join(f"{k}={v}" for k, v in found.items())
        have = ", ".join(f"{k}={built[k]}" for k in wrong)
        raise CheckpointError(
            f"{path!r} ({kind}) holds a CLIP image encoder with {want}, but the model was built with {have}; "
            f"build ClipVisual({want}) to use these weights (OpenAI's models use heads=width // 64)")


def _adapt_positional_embedding(pos: torch.Tensor, model: ClipVisual, path: str, report: LoadReport) -> torch.Tensor:
    """``[1 + N, width]`` of the file -> ``[1 + H*W, width]`` of the model."""
    if pos.dim() != 2 or pos.shape[0] < 2 or pos.shape[1] != model.width:
        raise CheckpointError(f"{path!r} ({report.kind}): 'positional_embedding' has shape {list(pos.shape)}, "
                              f"expected [1 + patches, {model.width}]; build the model with the width the "
                              f"checkpoint was trained with")
    if not pos.is_floating_point():
        raise CheckpointError(f"{path!r} ({report.kind}): 'positional_embedding' is stored as {pos.dtype}, not "
                              f"floating point; the file is damaged or not a CLIP checkpoint")
    grid = fit_position_grid(pos[1:], model, "positional_embedding", report)
    if grid.shape == pos[1:].shape:
        return pos  # CLIP-ReID's own checkpoints are stored at their training grid: copied as stored
    out = torch.cat([pos[:1].float(), grid])
    report.resized["positional_embedding"] = (tuple(pos.shape), tuple(out.shape))
    return out


def clip_checkpoint_filter(
    checkpoint: Mapping[str, Any], model: ClipVisual, path: str = "<state dict>", fmt: str = "state dict",
) -> tuple[dict[str, torch.Tensor], LoadReport, dict[str, torch.Tensor]]:
    """Map a CLIP checkpoint of any supported layout to ``model``'s keys, without touching ``model``.

    Args:
        checkpoint: what :func:`reid_ms.weights.read_checkpoint` returns: a state dict, possibly under
            a ``state_dict`` / ``model`` wrapper and with a ``module.`` prefix; TorchScript integer
            entries allowed.
        model: the :class:`~reid_ms.ClipVisual` the result is meant for (read for its shapes only).
        path, fmt: the file and its container, for messages and the report.

    Returns:
        ``(state, report, heads)``: ``state`` names every tensor of ``model.state_dict()`` (a camera/view
        table the file lacks is the model's own, listed in ``report.kept_init``); ``report`` gives the kind
        (``openai``, ``open_clip``, ``clip-reid``, ``clip-visual``) and what was ignored (key -> reason)
        or resized; ``heads`` holds a CLIP-ReID checkpoint's trained BNNecks and classifiers
        (``bottleneck_proj.*``, ``classifier_proj.weight``, ...), by file key, each also in ``report.ignored``.
    """
    wrapped = isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping)
    tensors, ignored = flatten_state_dict(checkpoint, path)
    tensors, had_module_prefix = strip_prefix(tensors)
    keys = list(tensors)
    if _is_vit(keys):
        example = next(k for k in keys if _is_vit([k]))
        raise CheckpointError(
            f"{path!r} is a ViT / TransReID checkpoint (keys like {example!r}), not a CLIP one: load it into "
            f"reid_ms.VitTrans with reid_ms.load_vit_weights")
    report = LoadReport(path=path, format=fmt, kind="clip-visual", ignored=ignored)

    visual: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    if any(k.startswith("image_encoder.") for k in keys):
        report.kind = "clip-reid"
        for k, v in tensors.items():
            group = k.split(".", 1)[0]
            head = next((what for name, what in _CLIP_REID_HEADS.items() if group.startswith(name)), None)
            if k.startswith("image_encoder."):
                visual[k[len("image_encoder."):]] = v
            elif k == "cv_embed":
                visual[k] = v
            elif head is not None:
                report.ignored[k] = f"{head}, not part of the image encoder"
                if group.startswith(("bottleneck", "classifier")):
                    heads[k] = v
            else:
                unknown.append(k)
    elif any(k.startswith("visual.") for k in keys):
        report.kind = "open_clip" if wrapped or had_module_prefix else "openai"
        for k, v in tensors.items():
            if k.startswith("visual."):
                visual[k[len("visual."):]] = v
            elif k in _METADATA:
                report.ignored[k] = "model metadata"
            elif k.startswith(_TEXT_TOWER) or k in _CLIP_HEAD:
                report.ignored[k] = "text tower / contrastive head, not part of the image encoder"
            else:
                unknown.append(k)
    elif "conv1.weight" in tensors or "class_embedding" in tensors:
        visual = dict(tensors)
    else:
        raise CheckpointError(
            f"{path!r} is not a CLIP checkpoint reid_ms knows: no 'visual.*', 'image_encoder.*' or bare "
            f"'conv1.weight' / 'class_embedding' keys (found {sorted(keys)[:8]}); load_clip_weights reads "
            f"OpenAI, open_clip and CLIP-ReID checkpoints")
    if unknown:
        raise CheckpointError(f"{path!r} ({report.kind}) has entries outside the image encoder that reid_ms "
                              f"does not know: {unknown[:6]}; nothing was loaded")

    _check_architecture(visual, model, path, report.kind)
    check_declared(visual, report, memory_budget(model))
    if "positional_embedding" in visual:
        visual["positional_embedding"] = _adapt_positional_embedding(visual["positional_embedding"], model, path,
                                                                     report)

    fit_side_table(visual, "cv_embed", model, report)
    return visual, report, heads


def load_clip_weights(model: ClipVisual | ClipText | PromptLearner, path: str | os.PathLike) -> LoadReport:
    """Load a CLIP checkpoint file into ``model`` (a :class:`~reid_ms.ClipVisual`), all of it or nothing.

    A :class:`~reid_ms.ClipText` or :class:`~reid_ms.PromptLearner` gets the text half of the same files
    (:func:`reid_ms.weights.clip_text.load_clip_text_weights`).

    Reads OpenAI's TorchScript archives (without running TorchScript), OpenAI-layout and open_clip state
    dicts, ``.safetensors`` and CLIP-ReID-trained checkpoints. A square position table (OpenAI's 14x14)
    is resized (bilinear, ``align_corners=False``, no antialias) to the model's grid; fp16 tensors are
    cast to the model's dtype. Anything that cannot be loaded faithfully raises
    :class:`~reid_ms.CheckpointError` and leaves the model unchanged.

    Returns:
        A :class:`~reid_ms.LoadReport` of what was loaded, ignored, resized and kept at initialisation.
    """
    if isinstance(model, (ClipText, PromptLearner)):
        return load_clip_text_weights(model, path)  # the text half of the same files
    if not isinstance(model, ClipVisual):
        raise ConfigError(f"load_clip_weights loads into reid_ms.ClipVisual (or ClipText / PromptLearner), got "
                          f"{type(model).__name__}; "
                          f"for a built model pass its backbone, for a VitTrans use load_vit_weights")
    return load_file(model, path, lambda obj, file, fmt: clip_checkpoint_filter(obj, model, file, fmt)[:2])
