"""Loading the text half of CLIP checkpoints into :class:`reid_ms.ClipText` and :class:`reid_ms.PromptLearner`.

The same files as the image side, recognised from their keys: OpenAI's TorchScript ``ViT-B-16.pt`` and
OpenAI-layout state dicts (the text tower at the top level: ``token_embedding``, ``positional_embedding``,
``transformer.*``, ``ln_final``, ``text_projection``), open_clip checkpoints (``state_dict`` wrapper,
``module.`` prefix), ``.safetensors``, a saved :class:`~reid_ms.PromptLearner` (``text.*`` and the prompts)
and CLIP-ReID-trained checkpoints (``text_encoder.*`` and ``prompt_learner.{cls_ctx,token_prefix,token_suffix}``).

CLIP-ReID's checkpoints hold no ``token_embedding`` (its text encoder only ever sees embedded prompts):
loading one keeps the model's token embedding, and the report lists it under ``kept_init``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Union

import torch

from reid_ms.backbones.clip_text import ClipText, PromptLearner
from reid_ms.errors import CheckpointError
from reid_ms.weights._common import LoadReport, check_declared, load_file, memory_budget
from reid_ms.weights._io import flatten_state_dict, strip_prefix

logger = logging.getLogger("reid_ms.weights")

TextModel = Union[ClipText, PromptLearner]

_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_PROMPT_KEYS = ("cls_ctx", "token_prefix", "token_suffix")
_METADATA = ("input_resolution", "context_length", "vocab_size")
_BLOCK_INDEX = re.compile(r"^transformer\.resblocks\.(\d+)\.")

# What a CLIP-ReID model holds beside its text side.
_CLIP_REID_IMAGE_SIDE = ("image_encoder.", "cv_embed", "bottleneck", "classifier")


def _is_text_key(key: str) -> bool:
    return key.startswith(_TEXT_KEYS)


def _split_file(tensors: dict[str, torch.Tensor], wrapped: bool, module_prefix: bool,
                report: LoadReport) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(text tower, prompts)`` of the file under ClipText's / PromptLearner's own names; the rest to ``ignored``."""
    keys = list(tensors)
    text: dict[str, torch.Tensor] = {}
    prompts: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    if any(k.startswith(("text_encoder.", "prompt_learner.")) for k in keys):
        report.kind = "clip-reid"
        for k, v in tensors.items():
            if k.startswith("text_encoder."):
                text[k[len("text_encoder."):]] = v
            elif k.startswith("prompt_learner."):
                prompts[k[len("prompt_learner."):]] = v
            elif k.startswith(_CLIP_REID_IMAGE_SIDE):
                report.ignored[k] = "CLIP-ReID image side, not part of the text encoder"
            else:
                unknown.append(k)
    elif any(k.startswith("text.") for k in keys) and any(k in _PROMPT_KEYS for k in keys):
        report.kind = "reid_ms-prompts"
        for k, v in tensors.items():
            if k.startswith("text."):
                text[k[len("text."):]] = v
            elif k in _PROMPT_KEYS:
                prompts[k] = v
            else:
                unknown.append(k)
    elif any(_is_text_key(k) for k in keys) and ("token_embedding.weight" in keys or "ln_final.weight" in keys):
        has_visual = any(k.startswith("visual.") for k in keys)
        report.kind = ("open_clip" if wrapped or module_prefix else "openai") if has_visual else "clip-text"
        for k, v in tensors.items():
            if k.endswith("attn_mask"):
                report.ignored[k] = "causal mask, built by the model"
            elif _is_text_key(k):
                text[k] = v
            elif k.startswith("visual."):
                report.ignored[k] = "image encoder, not part of the text tower"
            elif k in ("logit_scale", "logit_bias"):
                report.ignored[k] = "contrastive head"
            elif k in _METADATA:
                report.ignored[k] = "model metadata"
            else:
                unknown.append(k)
    else:
        visual = any(k.startswith(("visual.", "image_encoder.", "conv1.")) for k in keys)
        raise CheckpointError(
            f"{report.path!r} holds no CLIP text tower (found {sorted(keys)[:8]}"
            + ("; it is an image encoder only: load it into reid_ms.ClipVisual" if visual else "")
            + "); load_clip_weights reads the text half of OpenAI, open_clip and CLIP-ReID checkpoints")
    if unknown:
        raise CheckpointError(f"{report.path!r} ({report.kind}) has entries reid_ms does not know beside the text "
                              f"tower: {unknown[:6]}; nothing was loaded")
    return text, prompts


def _check_text_architecture(text: dict[str, torch.Tensor], model: ClipText, report: LoadReport) -> None:
    """Name the ClipText arguments when the file's text tower has other sizes."""
    found: dict[str, Any] = {}
    if (emb := text.get("token_embedding.weight")) is not None and emb.dim() == 2:
        found.update(vocab_size=emb.shape[0], width=emb.shape[1])
    if (pos := text.get("positional_embedding")) is not None and pos.dim() == 2:
        found.update(context_length=pos.shape[0], width=pos.shape[1])
    if (proj := text.get("text_projection")) is not None and proj.dim() == 2:
        found.update(width=proj.shape[0], output_dim=proj.shape[1])
    blocks = {int(m.group(1)) for k in text if (m := _BLOCK_INDEX.match(k))}
    if blocks:
        found["layers"] = max(blocks) + 1
    built = {"vocab_size": model.vocab_size, "width": model.width, "context_length": model.context_length,
             "output_dim": model.output_dim, "layers": model.layers}
    wrong = {k: v for k, v in found.items() if v != built[k]}
    if wrong:
        want = ", ".join(f"{k}={v}" for k, v in found.items())
        have = ", ".join(f"{k}={built[k]}" for k in wrong)
        raise CheckpointError(f"{report.path!r} ({report.kind}) holds a CLIP text tower with {want}, but the model "
                              f"was built with {have}; build ClipText({want}) to use these weights (OpenAI's text "
                              f"towers use heads=width // 64)")


def _check_prompts(prompts: dict[str, torch.Tensor], model: PromptLearner, report: LoadReport) -> None:
    """The file's learned prompts against the PromptLearner: identities, vectors per identity, template length."""
    missing = [k for k in _PROMPT_KEYS if k not in prompts]
    extra = [k for k in prompts if k not in _PROMPT_KEYS]
    if missing or extra:
        raise CheckpointError(f"{report.path!r} ({report.kind}): the learned prompts are incomplete or unknown "
                              f"(missing {missing}, unknown {extra}); expected cls_ctx, token_prefix, token_suffix")
    ctx, prefix, suffix = (prompts[k] for k in _PROMPT_KEYS)
    if ctx.dim() != 3 or ctx.shape[2] != model.text.width:
        raise CheckpointError(f"{report.path!r} ({report.kind}): cls_ctx has shape {list(ctx.shape)}, expected "
                              f"[num_classes, n_ctx, {model.text.width}]")
    if tuple(ctx.shape[:2]) != (model.num_classes, model.n_ctx):
        raise CheckpointError(f"{report.path!r} ({report.kind}) learned prompts for {ctx.shape[0]} identities with "
                              f"{ctx.shape[1]} vectors each, but the PromptLearner has num_classes="
                              f"{model.num_classes}, n_ctx={model.n_ctx}; build PromptLearner(text, num_classes="
                              f"{ctx.shape[0]}, n_ctx={ctx.shape[1]}) to use them")
    wrong_template = (f"build the PromptLearner with the template the prompts were learned with (its "
                      f"template {model.template!r} does not fit them)")
    for name, t in (("token_prefix", prefix), ("token_suffix", suffix)):
        want = tuple(getattr(model, name).shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"{report.path!r} ({report.kind}): {name} has shape {list(t.shape)} but the "
                                  f"PromptLearner's is {list(want)}; {wrong_template}")
    # The suffix's rows after the end-of-text token embed the padding id, all the same vector: a template whose
    # end-of-text falls elsewhere would read the feature at the wrong token.
    eot = model.eot_index - model.prefix_len - model.n_ctx
    padding = suffix[0, eot + 1:]
    if len(padding) and (not bool((padding == padding[0]).all()) or torch.equal(suffix[0, eot], padding[0])):
        raise CheckpointError(f"{report.path!r} ({report.kind}): the stored template's end-of-text token is not "
                              f"where the PromptLearner's is; {wrong_template}")


def clip_text_checkpoint_filter(
    checkpoint: Mapping[str, Any], model: TextModel, path: str = "<state dict>", fmt: str = "state dict",
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map the text half of a CLIP checkpoint to ``model``'s keys, without touching ``model``.

    Args:
        checkpoint: what :func:`reid_ms.weights._io.read_checkpoint` returns.
        model: a :class:`~reid_ms.ClipText`, or a :class:`~reid_ms.PromptLearner` (its text tower is
            ``text.*``, its prompts ``cls_ctx``, ``token_prefix``, ``token_suffix``).
        path, fmt: the file and its container, for messages and the report.

    Returns:
        ``(state, report)``: ``state`` names every tensor of ``model.state_dict()``. What the file lacks is
        the model's own and listed in ``report.kept_init``: the token embedding (CLIP-ReID files) and, for a
        PromptLearner and a file without prompts, ``cls_ctx`` and the template buffers (re-embedded after
        the load by :func:`load_clip_text_weights`).
    """
    wrapped = isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping)
    tensors, ignored = flatten_state_dict(checkpoint, path)
    tensors, module_prefix = strip_prefix(tensors)
    if any(k.startswith(("cls_token", "pos_embed", "blocks.", "base.")) for k in tensors):
        raise CheckpointError(f"{path!r} is a ViT / TransReID checkpoint, not a CLIP one: it has no text tower")
    report = LoadReport(path=path, format=fmt, kind="clip-text", ignored=ignored)
    text, prompts = _split_file(tensors, wrapped, module_prefix, report)
    tower = model.text if isinstance(model, PromptLearner) else model
    is_prompts = tower is not model
    _check_text_architecture(text, tower, report)
    check_declared({**text, **prompts}, report, memory_budget(model))
    prefix = "text." if is_prompts else ""
    target = model.state_dict()
    state = {prefix + k: v for k, v in text.items()}
    if "token_embedding.weight" not in text and report.kind == "clip-reid":
        key = prefix + "token_embedding.weight"
        state[key] = target[key]
        report.kept_init.append(key)
        if not is_prompts:
            logger.warning("%s: CLIP-ReID checkpoints hold no token_embedding; %s keeps its own, so load CLIP's "
                           "weights (ViT-B-16.pt) into it first to encode text", path, key)
    if isinstance(model, PromptLearner):
        if prompts:
            _check_prompts(prompts, model, report)
            state.update(prompts)
        else:
            for k in _PROMPT_KEYS:
                state[k] = target[k]
            report.kept_init.append("cls_ctx")
    elif prompts:
        report.ignored.update({f"prompt_learner.{k}": "learned prompts: load the file into a reid_ms.PromptLearner"
                               for k in prompts})
    return state, report


def load_clip_text_weights(model: TextModel, path: str | os.PathLike) -> LoadReport:
    """Load the text half of a CLIP checkpoint into ``model`` (a ClipText or a PromptLearner), all or nothing.

    Into a :class:`~reid_ms.PromptLearner`, a file with learned prompts (CLIP-ReID, a saved PromptLearner)
    fills ``cls_ctx`` and the template buffers as stored; a file without them (OpenAI, open_clip) loads the
    text tower, keeps ``cls_ctx`` and re-embeds the template with the loaded token embedding.
    """
    report = load_file(model, path, lambda obj, file, fmt: clip_text_checkpoint_filter(obj, model, file, fmt))
    if isinstance(model, PromptLearner) and "cls_ctx" in report.kept_init:
        model.embed_template()
    return report
