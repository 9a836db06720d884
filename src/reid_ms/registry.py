"""Named models: ``build("vit_b16_ms", camera_num=6, num_classes=751, pretrained=path)``.

A registered name maps to a :class:`ModelSpec` (which backbone, its loader, which neck mode, whether a
width adapter comes first). :func:`build` constructs the parts in order (backbone, adapter, neck, head),
each at the width the previous one returns, so a width override on the backbone (``embed_dim``,
``output_dim``) or the adapter (``adapt_dim``) carries through to the neck and the head. Overrides are
routed to the part whose constructor names them.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import ConfigError
from reid_ms.heads.bnneck import BNNeckBase, BNNeckHead
from reid_ms.models import BuiltModel, JPMReIDModel, MultiModalReIDModel, ReIDModel
from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow
from reid_ms.preprocess import input_config
from reid_ms.weights import load_clip_weights, load_vit_weights
from reid_ms.weights._common import LoadReport, load_all_or_nothing, memory_budget
from reid_ms.weights._io import read_checkpoint
from reid_ms.weights.built import built_model_filter
from reid_ms.weights.jpm import jpm_checkpoint_filter, load_jpm_weights
from reid_ms.weights.multimodal import load_multimodal_weights

logger = logging.getLogger("reid_ms.registry")

# build() arguments of the adapter, mapped to DimAdapter's own names (its in_dim is the backbone's out_dim)
ADAPTER_ARGS = {"adapt_dim": "out_dim", "adapt_norm": "norm"}


@dataclass(frozen=True)
class ModelSpec:
    """What a registered name builds.

    Attributes:
        backbone: the backbone class; every argument of its constructor can be overridden in ``build``.
        loader: ``loader(backbone, path) -> LoadReport`` for ``build(..., pretrained=path)``; with ``model``
            set, ``loader(model, path)`` (the whole model).
        backbone_args: defaults for the backbone that differ from its constructor's.
        neck_mode: ``"dense"`` or ``"light"`` for a :class:`~reid_ms.MultiScaleSlidingWindow`; ``None``
            for no neck.
        adapt_dim: width of a :class:`~reid_ms.DimAdapter` between backbone and neck; ``None`` for none.
        head_prefix: checkpoint prefix of a trained BNNeck whose feature is this model's feature before
            any neck (``bottleneck.`` for TransReID, ``bottleneck_proj.`` for CLIP-ReID's projected
            feature); ``None`` when no trained head fits (an adapter changes the feature).
        classifier_key: the trained classifier's weight next to that BNNeck.
        model: a model class other than :class:`~reid_ms.ReIDModel` (``None``), built as
            ``model(backbone, neck=neck, **args)``; it makes its own head, so its constructor's arguments
            (``num_classes``, ``neck_feat``, ...) take the place of the head's in ``build``.
    """

    backbone: type[nn.Module]
    # Any: each loader takes its own model class (load_vit_weights a VitTrans, a user's loader theirs)
    loader: Callable[[Any, str | os.PathLike], LoadReport]
    backbone_args: Mapping[str, Any] = field(default_factory=dict)
    neck_mode: Optional[str] = None
    adapt_dim: Optional[int] = None
    head_prefix: Optional[str] = None
    classifier_key: Optional[str] = None
    model: Optional[type[BuiltModel]] = None


_REGISTRY: dict[str, ModelSpec] = {}
# (module, qualified name) of the function each name was registered from: a definition run again (a
# notebook cell, importlib.reload) replaces its own entry, a different function needs override=True
_ORIGIN: dict[str, tuple[str, str]] = {}


def _params(cls: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and n not in exclude and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _part_args(spec: ModelSpec) -> dict[str, list[str]]:
    """The overridable arguments of each part of ``spec``, including parts it lacks (for messages)."""
    parts = {"backbone": _params(spec.backbone), "adapter": list(ADAPTER_ARGS),
             "neck": _params(MultiScaleSlidingWindow, exclude=("feat_dim",))}
    if spec.model is None:
        parts["head"] = _params(BNNeckHead, exclude=("feat_dim",))
    else:
        parts["model"] = _params(spec.model, exclude=("backbone", "neck"))
    return parts


def register(name: str, override: bool = False) -> Callable[[Callable[[], ModelSpec]], Callable[[], ModelSpec]]:
    """Register the :class:`ModelSpec` returned by the decorated function under ``name``.

    ::

        @register("vit_s16_ms_light")
        def vit_s16_ms_light() -> ModelSpec:
            return ModelSpec(VitTrans, load_vit_weights, dict(embed_dim=384, num_heads=6), neck_mode="light")

    Registering a name again from the same definition (same module and function name: a notebook cell
    run twice, a reloaded module) replaces the entry. A different function under a taken name is a
    :class:`ConfigError` unless ``override=True``, so two libraries cannot silently shadow each other.
    """

    def decorator(fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
        origin = (getattr(fn, "__module__", None) or "", getattr(fn, "__qualname__", None) or repr(fn))
        if name in _REGISTRY and not override and _ORIGIN.get(name) != origin:
            where = ".".join(_ORIGIN.get(name, ("", "?"))).lstrip(".")
            raise ConfigError(f"a model named {name!r} is already registered (by {where}); choose another name, "
                              f"or pass register({name!r}, override=True) to replace it")
        spec = fn()
        if not isinstance(spec, ModelSpec):
            raise ConfigError(f"@register({name!r}) expects a function returning a ModelSpec, "
                              f"got {type(spec).__name__}")
        if spec.model is not None and spec.adapt_dim is not None:
            raise ConfigError(f"{name!r}: a ModelSpec with a model class takes no adapt_dim (the model class "
                              f"is given the backbone and the neck only)")
        parts = _part_args(spec)
        seen: dict[str, str] = {}
        for part, names in parts.items():
            for n in names:
                if n in seen:
                    raise ConfigError(f"{name!r}: argument {n!r} belongs to both the {seen[n]} and the {part}; "
                                      f"build() could not tell where an override goes")
                seen[n] = part
        _REGISTRY[name] = spec
        _ORIGIN[name] = origin
        return fn

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered under ``name``; a :class:`ConfigError` with close matches otherwise."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ConfigError(f"unknown model {name!r}; {hint}known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def _route(name: str, spec: ModelSpec, overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    parts = _part_args(spec)
    present = {"backbone": True, "adapter": spec.adapt_dim is not None, "neck": spec.neck_mode is not None,
               "head": True, "model": True}
    routed: dict[str, dict[str, Any]] = {part: {} for part in parts}
    for key, value in overrides.items():
        part = next((p for p, names in parts.items() if key in names), None)
        if part is None:
            valid = [n for p, names in parts.items() if present[p] for n in names]
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise ConfigError(f"build({name!r}) got an unknown argument {key!r}; {hint}"
                              f"valid arguments: {', '.join(sorted(valid))}")
        if not present[part]:
            with_part = [m for m in list_models()
                         if (_REGISTRY[m].neck_mode if part == "neck" else _REGISTRY[m].adapt_dim) is not None]
            raise ConfigError(f"build({name!r}) got {key!r}, an argument of the {part}, but {name!r} has no "
                              f"{part}; models with one: {', '.join(with_part)}")
        routed[part][key] = value
    return routed


def build(name: str, pretrained: str | os.PathLike | None = None, **overrides: Any) -> BuiltModel:
    """Build the registered model ``name`` (see :func:`list_models`).

    Args:
        name: a registered model name, e.g. ``"vit_b16_ms"``.
        pretrained: path of a local checkpoint, loaded into the backbone with the spec's loader
            (:func:`~reid_ms.load_vit_weights` / :func:`~reid_ms.load_clip_weights`); the report is kept
            as ``model.load_report``. A re-ID-trained checkpoint whose BNNeck fits the head (same width,
            no adapter in between) also fills the head's BatchNorm, and its classifier when
            ``num_classes`` matches; those keys are listed in the report as ``head.*``.
        **overrides: constructor arguments of the backbone (``img_size``, ``stride_size``,
            ``camera_num``, ``embed_dim``, ``output_dim``, ...), the adapter (``adapt_dim``,
            ``adapt_norm``), the neck (``scales``, ``mode``) and the head (``num_classes``, ``neck_feat``).

    Returns:
        A :class:`~reid_ms.ReIDModel` (or the spec's model class: :class:`~reid_ms.JPMReIDModel`,
        :class:`~reid_ms.MultiModalReIDModel`) with ``model.model_name``, ``model.load_report``
        (``None`` without ``pretrained``) and ``model.pretrained_cfg``, its input configuration
        (:func:`reid_ms.preprocess.input_config`: size, mean, std, interpolation).
    """
    spec = get_spec(name)
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise ConfigError(f"build({name!r}, pretrained={pretrained!r}): pretrained takes the path of a local "
                          f"checkpoint file (reid_ms downloads nothing), or None for random initialisation")
    routed = _route(name, spec, overrides)
    backbone: Any = spec.backbone(**{**spec.backbone_args, **routed["backbone"]})
    width: int = backbone.out_dim
    adapter = None
    if spec.adapt_dim is not None:
        adapter_args = {ADAPTER_ARGS[k]: v for k, v in routed["adapter"].items()}
        adapter = DimAdapter(width, **{"out_dim": spec.adapt_dim, **adapter_args})
        width = adapter.out_dim
    neck = None
    if spec.neck_mode is not None:
        neck = MultiScaleSlidingWindow(width, **{"mode": spec.neck_mode, **routed["neck"]})
    model = (ReIDModel(backbone, neck=neck, head=BNNeckHead(width, **routed["head"]), adapter=adapter)
             if spec.model is None else spec.model(backbone, neck=neck, **routed["model"]))
    model.model_name = name
    model.pretrained_cfg = input_config(model)
    if pretrained is not None:
        model.load_report = _load_pretrained(model, spec, os.fspath(pretrained))
    return model


def _load_pretrained(model: BuiltModel, spec: ModelSpec, path: str) -> LoadReport:
    """Read ``path`` once and load it into the whole ``model``, all of it or nothing.

    A saved model of this build loads exactly; a backbone checkpoint fills the backbone and, for a
    re-ID-trained one, the head where it fits; the rest keeps its initialisation. A loader registered
    by a user (not one of the library's) is called as it is.
    """
    if spec.loader not in (load_vit_weights, load_clip_weights, load_jpm_weights, load_multimodal_weights):
        return spec.loader(model if spec.model is not None else model.backbone, path)
    obj, fmt = read_checkpoint(path, memory_budget(model))
    if spec.loader is load_jpm_weights:
        state, report = jpm_checkpoint_filter(obj, model, path, fmt)
    else:
        prefix = spec.head_prefix
        fill = None if prefix is None else (lambda heads, rep: _head_state(model.head, prefix, spec.classifier_key,
                                                                          heads, rep))
        state, report = built_model_filter(obj, model, path, fmt, fill_head=fill)
    return load_all_or_nothing(model, state, report)


def _head_state(head: BNNeckBase, prefix: str, classifier_key: Optional[str], heads: dict[str, torch.Tensor],
                report: LoadReport) -> dict[str, torch.Tensor]:
    """The model's ``head.*`` keys filled from the trained BNNeck of a re-ID checkpoint, when it fits exactly."""
    target = head.bottleneck.state_dict()
    state = {k: heads[prefix + k] for k in target if prefix + k in heads}
    if not state:
        return {}
    # checkpoints from before BatchNorm counted its batches lack num_batches_tracked: ours is kept then
    needed = [k for k in target if k != "num_batches_tracked"]
    if any(k not in state for k in needed) or any(v.shape != target[k].shape for k, v in state.items()):
        logger.info("%s: the trained BNNeck under %r does not fit the %d-wide head; the head keeps its "
                    "initialisation", report.path, prefix, head.feat_dim)
        return {}
    out = {f"head.bottleneck.{k}": v for k, v in state.items()}
    used = [prefix + k for k in state]
    if classifier_key in heads and head.classifier is not None and (
            heads[classifier_key].shape == head.classifier.weight.shape):
        out["head.classifier.weight"] = heads[classifier_key]
        used.append(classifier_key)
    for k in used:
        report.ignored.pop(k, None)
    logger.info("%s: the head is filled from the trained %s", report.path, ", ".join(used))
    return out


_VIT = ModelSpec(VitTrans, load_vit_weights, head_prefix="bottleneck.", classifier_key="classifier.weight")
_CLIP = ModelSpec(ClipVisual, load_clip_weights, head_prefix="bottleneck_proj.",
                  classifier_key="classifier_proj.weight")
_BUILTIN = {
    # TransReID's ViT-B/16 baseline (CLS -> BNNeck), then with the dense (768 wide, scales 4/8/16) or the light
    # (depthwise + shared pointwise) multi-scale neck
    "vit_b16": _VIT,
    "vit_b16_ms": replace(_VIT, neck_mode="dense"),
    "vit_b16_ms_light": replace(_VIT, neck_mode="light"),
    # CLIP-ReID's ViT-B/16 image encoder on its projected 512-wide tokens, the necks at that width
    "clip_b16": _CLIP,
    "clip_b16_ms": replace(_CLIP, neck_mode="dense"),
    "clip_b16_ms_light": replace(_CLIP, neck_mode="light"),
    # CLIP ViT-B/16, a DimAdapter 512 -> 768, then the neck at 768 (the ViT neck's width); no trained head fits
    "clip_b16_adapt_ms": ModelSpec(ClipVisual, load_clip_weights, neck_mode="dense", adapt_dim=768),
    "clip_b16_adapt_ms_light": ModelSpec(ClipVisual, load_clip_weights, neck_mode="light", adapt_dim=768),
    # TransReID's Jigsaw Patch Module: global + 4 local features, a 3840-wide embedding; then with the dense
    # neck on the global branch's tokens (see JPMReIDModel)
    "vit_b16_jpm": ModelSpec(VitTrans, load_jpm_weights, model=JPMReIDModel),
    "vit_b16_ms_jpm": ModelSpec(VitTrans, load_jpm_weights, neck_mode="dense", model=JPMReIDModel),
    # RGB/NIR/TIR: a shared backbone and dense neck over the modalities, embeddings concatenated (3 x 768 / 512)
    "vit_b16_ms_rgbnt": ModelSpec(VitTrans, load_multimodal_weights, neck_mode="dense", model=MultiModalReIDModel),
    "clip_b16_ms_rgbnt": ModelSpec(ClipVisual, load_multimodal_weights, neck_mode="dense", model=MultiModalReIDModel),
}
for _name, _spec in _BUILTIN.items():
    register(_name)(lambda: _spec)  # called at once, so the loop variable is the current spec
