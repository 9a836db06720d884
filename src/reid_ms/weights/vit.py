"""Loading ViT checkpoints into :class:`reid_ms.VitTrans`.

Recognised from their keys, never from the file name: timm / jx ImageNet state dicts (plain or under
``model`` / ``state_dict``), ImageNet-21k files (``pre_logits``), DeiT (``dist_token`` and a position
table with two prefix tokens), Google's ``.npz`` layout (``Transformer/encoderblock_N/...``) and
checkpoints trained by TransReID (backbone under ``base.``, camera/view table ``sie_embed``).
:func:`vit_checkpoint_filter` maps any of them to the model's keys; :func:`load_vit_weights` then loads
all of it or nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import CheckpointError, ConfigError
from reid_ms.weights._common import (LoadReport, check_declared, fit_position_grid, fit_side_table, load_file,
                                     memory_budget, square_side)
from reid_ms.weights._io import flatten_state_dict, strip_prefix


def _is_clip(keys: list[str]) -> bool:
    return any(k.startswith(("visual.", "image_encoder.")) or "transformer.resblocks" in k
               or k in ("class_embedding", "positional_embedding", "conv1.weight", "cv_embed") for k in keys)


def _from_google_npz(w: dict[str, torch.Tensor], prefix: str, path: str,
                     report: LoadReport, budget: int) -> dict[str, torch.Tensor]:
    """Google's JAX layout to timm names: kernels are [in, out], attention kernels split per head.

    Every entry it converts is sized against ``budget`` first (a concatenation materialises its inputs);
    heads are listed in ``report.ignored``.
    """
    heads = ("head/", "pre_logits/")
    check_declared({k: v for k, v in w.items() if k.startswith(prefix) and not k[len(prefix):].startswith(heads)},
                   report, budget)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in w:
            raise CheckpointError(f"{path!r} is a Google ViT .npz but lacks {key!r}; the file is incomplete "
                                  f"or from another model family")
        used.add(key)
        return w[key]

    kernel = take("embedding/kernel")
    if kernel.dim() != 4:
        raise CheckpointError(f"{path!r}: 'embedding/kernel' has shape {list(kernel.shape)}, expected a 4-D "
                              f"convolution kernel [kh, kw, in, D]")
    state["patch_embed.proj.weight"] = kernel.permute(3, 2, 0, 1)  # HWIO -> OIHW
    state["patch_embed.proj.bias"] = take("embedding/bias")
    state["cls_token"] = take("cls")
    state["pos_embed"] = take("Transformer/posembed_input/pos_embedding")
    state["norm.weight"] = take("Transformer/encoder_norm/scale")
    state["norm.bias"] = take("Transformer/encoder_norm/bias")
    i = 0
    while f"{prefix}Transformer/encoderblock_{i}/LayerNorm_0/scale" in w:
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = src + "MultiHeadDotProductAttention_1/"
        state[dst + "norm1.weight"] = take(src + "LayerNorm_0/scale")
        state[dst + "norm1.bias"] = take(src + "LayerNorm_0/bias")
        # query/key/value kernels are [D, heads, head_dim]; timm's qkv is one [3*D, D] Linear.
        state[dst + "attn.qkv.weight"] = torch.cat([take(f"{attn}{n}/kernel").flatten(1).t()
                                                    for n in ("query", "key", "value")])
        state[dst + "attn.qkv.bias"] = torch.cat([take(f"{attn}{n}/bias").reshape(-1)
                                                  for n in ("query", "key", "value")])
        state[dst + "attn.proj.weight"] = take(attn + "out/kernel").flatten(0, 1).t()  # [heads, hd, D]
        state[dst + "attn.proj.bias"] = take(attn + "out/bias")
        state[dst + "norm2.weight"] = take(src + "LayerNorm_2/scale")
        state[dst + "norm2.bias"] = take(src + "LayerNorm_2/bias")
        for r in (0, 1):
            state[dst + f"mlp.fc{r + 1}.weight"] = take(src + f"MlpBlock_3/Dense_{r}/kernel").t()
            state[dst + f"mlp.fc{r + 1}.bias"] = take(src + f"MlpBlock_3/Dense_{r}/bias")
        i += 1
    unknown = []
    for key in w:
        if key in used:
            continue
        if key[len(prefix):].startswith(heads):
            report.ignored[key] = "classifier head, not part of the backbone"
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{path!r} is a Google ViT .npz with entries reid_ms does not know: {unknown[:6]}; "
                              f"only the layout of google-research/vision_transformer (encoderblock_N) is read")
    return state


def _adapt_pos_embed(pos: torch.Tensor, n_prefix: int, model: VitTrans, path: str, kind: str,
                     report: LoadReport) -> torch.Tensor:
    """Position table ``[1, n_prefix + N, D]`` of the file -> ``[1, 1 + H*W, D]`` of the model."""
    if not pos.is_floating_point():
        raise CheckpointError(f"{path!r} ({kind}): 'pos_embed' is stored as {pos.dtype}, not floating point; "
                              f"the file is damaged or not a ViT checkpoint")
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] <= n_prefix or pos.shape[2] != model.embed_dim:
        raise CheckpointError(f"{path!r} ({kind}): 'pos_embed' has shape {list(pos.shape)}, expected "
                              f"[1, {n_prefix} + patches, {model.embed_dim}]; build the model with the embed_dim "
                              f"the checkpoint was trained with")
    old_shape = tuple(pos.shape)
    grid = fit_position_grid(pos[0, n_prefix:], model, "pos_embed", report)
    out = torch.cat((pos[:, :1].to(grid.dtype), grid.unsqueeze(0)), dim=1)
    if tuple(out.shape) != old_shape:
        report.resized["pos_embed"] = (old_shape, tuple(out.shape))
    return out


def vit_checkpoint_filter(checkpoint: Mapping[str, Any], model: VitTrans, path: str = "<state dict>",
                          fmt: str = "state dict") -> tuple[dict[str, torch.Tensor], LoadReport, dict[str, torch.Tensor]]:
    """Map a ViT checkpoint of any supported layout to ``model``'s keys, without touching ``model``.

    Args:
        checkpoint: what :func:`reid_ms.weights.read_checkpoint` returns: a state dict, possibly under a
            ``model`` / ``state_dict`` wrapper and with a ``module.`` prefix.
        model: the :class:`~reid_ms.VitTrans` the result is meant for (read for its shapes only).
        path, fmt: the file and its container, for messages and the report.

    Returns:
        ``(state, report, heads)``: ``state`` names every tensor of ``model.state_dict()`` (the
        camera/view table the file lacks is the model's own, listed in ``report.kept_init``); ``report``
        says the kind of checkpoint and what was ignored (key -> reason) or resized (``report.loaded`` is
        filled by the load); ``heads`` holds the re-ID head a TransReID checkpoint carries beside the
        backbone (``bottleneck.*``, ``classifier.weight``), by file key, each also in ``report.ignored``.
    """
    tensors, ignored = flatten_state_dict(checkpoint, path)
    tensors, _ = strip_prefix(tensors)
    keys = list(tensors)
    if _is_clip(keys):
        raise CheckpointError(
            f"{path!r} is a CLIP checkpoint (keys like {next(k for k in keys if _is_clip([k]))!r}), not a "
            f"ViT/TransReID one: load it into reid_ms.ClipVisual with reid_ms.load_clip_weights")
    report = LoadReport(path=path, format=fmt, kind="imagenet", ignored=ignored)
    budget = memory_budget(model)
    state = tensors
    heads: dict[str, torch.Tensor] = {}

    # Google's names, possibly under a prefix such as "opt/target/".
    npz_anchor = next((k for k in state if k == "embedding/kernel" or k.endswith("/embedding/kernel")), None)
    if npz_anchor is not None:
        report.kind = "google-npz"
        try:
            state = _from_google_npz(tensors, npz_anchor[: -len("embedding/kernel")], path, report, budget)
        except (RuntimeError, IndexError) as e:  # kernels whose shapes do not fit together
            raise CheckpointError(f"{path!r} is a Google ViT .npz whose tensors do not fit together ({e}); the "
                                  f"file is damaged or not from google-research/vision_transformer") from e
    elif any(k.startswith("base.") for k in state):
        report.kind = "transreid"
        backbone = {}
        for k, v in state.items():
            if not k.startswith("base."):
                report.ignored[k] = "TransReID re-ID head, not part of the backbone"
                heads[k] = v
            elif k.startswith("base.fc."):
                report.ignored[k] = "TransReID's unused classifier of the ViT"
            else:
                backbone[k[len("base."):]] = v
        state = backbone
    elif any(k.startswith("pre_logits.") for k in state):
        report.kind = "imagenet-21k"
    elif "dist_token" in state:
        report.kind = "deit"
    elif "sie_embed" in state:
        report.kind = "transreid"

    kept: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith(("head.", "head_dist.", "pre_logits.", "fc.")):
            report.ignored[k] = "classifier head, not part of the backbone"
        elif k == "dist_token":
            report.ignored[k] = "DeiT distillation token; TransReID does not use it"
        else:
            kept[k] = v
    state = kept
    check_declared(state, report, budget)

    target = model.state_dict()
    proj = state.get("patch_embed.proj.weight")
    want = target["patch_embed.proj.weight"]
    if proj is not None and tuple(proj.shape) != tuple(want.shape):
        raise CheckpointError(
            f"{path!r} ({report.kind}): the patch embedding is {list(proj.shape)} [D, in_chans, kh, kw] in the "
            f"file but {list(want.shape)} in the model; build the model with patch_size={tuple(proj.shape[2:])}, "
            f"in_chans={proj.shape[1]} and embed_dim={proj.shape[0]} to use these weights")

    if "pos_embed" in state:
        n_prefix = 1
        if report.kind == "deit":
            count = state["pos_embed"].shape[-2]
            if square_side(count - 2) is None and count - 2 != model.num_patches:
                raise CheckpointError(f"{path!r} has a DeiT dist_token but its position table holds {count} "
                                      f"tokens, not 2 prefix tokens plus a square grid; the file is not a "
                                      f"DeiT checkpoint reid_ms can read")
            n_prefix = 2
            report.ignored["pos_embed[:, 1]"] = "position of the DeiT distillation token"
        state["pos_embed"] = _adapt_pos_embed(state["pos_embed"], n_prefix, model, path, report.kind, report)

    fit_side_table(state, "sie_embed", model, report)
    return state, report, heads


def load_vit_weights(model: VitTrans, path: str | os.PathLike) -> LoadReport:
    """Load a ViT checkpoint file into ``model`` (a :class:`~reid_ms.VitTrans`), all of it or nothing.

    Reads timm / jx / DeiT ImageNet ``.pth`` files, ImageNet-21k files, Google ``.npz`` files,
    ``.safetensors`` and TransReID-trained checkpoints; the position table is resized (bilinear,
    ``align_corners=False``, no antialias) from a square ImageNet grid to the model's grid, fp16 tensors
    are cast to the model's dtype. Anything that cannot be loaded faithfully raises
    :class:`~reid_ms.CheckpointError` and leaves the model unchanged.

    Returns:
        A :class:`~reid_ms.LoadReport` of what was loaded, ignored, resized and kept at initialisation.
    """
    if not isinstance(model, VitTrans):
        raise ConfigError(f"load_vit_weights loads into reid_ms.VitTrans, got {type(model).__name__}; "
                          f"for a built model pass its backbone, for a ClipVisual use load_clip_weights")
    return load_file(model, path, lambda obj, file, fmt: vit_checkpoint_filter(obj, model, file, fmt)[:2])
