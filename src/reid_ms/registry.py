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
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import ConfigError
from reid_ms.heads import BNNeckHead
from reid_ms.model import ReIDModel
from reid_ms.models import JPMReIDModel, MultiModalReIDModel
from reid_ms.models.multimodal import load_multimodal_weights
from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow
from reid_ms.preprocess import input_config
from reid_ms.weights import load_clip_weights, load_vit_weights
from reid_ms.weights.jpm import load_jpm_weights
from reid_ms.weights._common import LoadReport, cast_like
from reid_ms.weights._io import flatten_state_dict, read_checkpoint

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
    loader: Callable[[nn.Module, str], LoadReport]
    backbone_args: Mapping[str, Any] = field(default_factory=dict)
    neck_mode: Optional[str] = None
    adapt_dim: Optional[int] = None
    head_prefix: Optional[str] = None
    classifier_key: Optional[str] = None
    model: Optional[type[nn.Module]] = None


_REGISTRY: dict[str, ModelSpec] = {}


def _params(cls: type, exclude: tuple[str, ...] = ()) -> list[str]:
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and n not in exclude and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _part_args(spec: ModelSpec) -> dict[str, list[str]]:
    """The overridable arguments of each part of ``spec``, including parts it lacks (for messages)."""
    parts = {
        "backbone": _params(spec.backbone),
        "adapter": list(ADAPTER_ARGS),
        "neck": _params(MultiScaleSlidingWindow, exclude=("feat_dim",)),
    }
    if spec.model is None:
        parts["head"] = _params(BNNeckHead, exclude=("feat_dim",))
    else:
        parts["model"] = _params(spec.model, exclude=("backbone", "neck"))
    return parts


def register(name: str) -> Callable[[Callable[[], ModelSpec]], Callable[[], ModelSpec]]:
    """Register the :class:`ModelSpec` returned by the decorated function under ``name``.

    ::

        @register("vit_s16_ms_light")
        def vit_s16_ms_light() -> ModelSpec:
            return ModelSpec(VitTrans, load_vit_weights, dict(embed_dim=384, num_heads=6), neck_mode="light")
    """

    def decorator(fn: Callable[[], ModelSpec]) -> Callable[[], ModelSpec]:
        if name in _REGISTRY:
            raise ConfigError(f"a model named {name!r} is already registered; choose another name")
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


def build(name: str, pretrained: str | os.PathLike | None = None,
          **overrides: Any) -> ReIDModel | JPMReIDModel | MultiModalReIDModel:
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
    routed = _route(name, spec, overrides)
    backbone = spec.backbone(**{**spec.backbone_args, **routed["backbone"]})
    width = backbone.out_dim
    adapter = None
    if spec.adapt_dim is not None:
        adapter_args = {ADAPTER_ARGS[k]: v for k, v in routed["adapter"].items()}
        adapter = DimAdapter(width, **{"out_dim": spec.adapt_dim, **adapter_args})
        width = adapter.out_dim
    neck = None
    if spec.neck_mode is not None:
        neck = MultiScaleSlidingWindow(width, **{"mode": spec.neck_mode, **routed["neck"]})
    if spec.model is not None:
        model = spec.model(backbone, neck=neck, **routed["model"])
        model.model_name = name
        model.pretrained_cfg = input_config(model)   # read by timm's resolve_data_config and the extractor
        if pretrained is not None:
            model.load_report = spec.loader(model, pretrained)
        return model
    head = BNNeckHead(width, **routed["head"])
    model = ReIDModel(backbone, neck=neck, head=head, adapter=adapter)
    model.model_name = name
    model.pretrained_cfg = input_config(model)
    if pretrained is not None:
        report = spec.loader(backbone, pretrained)
        if spec.head_prefix is not None:
            _load_head(head, spec, report)
        model.load_report = report
    return model


def _load_head(head: BNNeckHead, spec: ModelSpec, report: LoadReport) -> None:
    """Fill ``head`` from the trained BNNeck the backbone loader left aside, when it fits exactly."""
    prefix = spec.head_prefix
    ignored_keys = [entry.split(" ", 1)[0] for entry in report.ignored]
    if not any(k.startswith(prefix) for k in ignored_keys):
        return
    obj, _ = read_checkpoint(report.path)
    tensors, _ = flatten_state_dict(obj, report.path)
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from DataParallel / DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    target = head.bottleneck.state_dict()
    state = {k: tensors[prefix + k] for k in target if prefix + k in tensors}
    # checkpoints from before BatchNorm counted its batches lack num_batches_tracked; keep ours then
    state.setdefault("num_batches_tracked", target["num_batches_tracked"])
    if set(state) != set(target) or any(state[k].shape != target[k].shape for k in target):
        logger.info("%s: the trained BNNeck under %r does not fit the %d-wide head; the head keeps its "
                    "initialisation", report.path, prefix, head.feat_dim)
        return
    # every tensor is checked (dtype kind, finite) before the first one is copied: all of the head or none
    checked = cast_like({prefix + k: v for k, v in state.items()}, {prefix + k: v for k, v in target.items()},
                        report.path, report.kind)
    weight = tensors.get(spec.classifier_key) if spec.classifier_key else None
    use_classifier = (head.classifier is not None and weight is not None
                      and weight.shape == head.classifier.weight.shape)
    if use_classifier:
        weight = cast_like({spec.classifier_key: weight}, {spec.classifier_key: head.classifier.weight},
                           report.path, report.kind)[spec.classifier_key]
    head.bottleneck.load_state_dict({k: checked[prefix + k] for k in target})
    used = [prefix + k for k in target if prefix + k in tensors]
    loaded = [f"head.bottleneck.{k}" for k in target if prefix + k in tensors]
    if use_classifier:
        with torch.no_grad():
            head.classifier.weight.copy_(weight)
        used.append(spec.classifier_key)
        loaded.append("head.classifier.weight")
    report.loaded += loaded
    report.ignored = [entry for entry, key in zip(report.ignored, ignored_keys) if key not in used]
    logger.info("%s: loaded the trained head from %s", report.path, ", ".join(used))


@register("vit_b16")
def vit_b16() -> ModelSpec:
    """TransReID's ViT-B/16 baseline: CLS -> BNNeck."""
    return ModelSpec(VitTrans, load_vit_weights, head_prefix="bottleneck.", classifier_key="classifier.weight")


@register("vit_b16_ms")
def vit_b16_ms() -> ModelSpec:
    """ViT-B/16 with the dense multi-scale neck (768 wide, scales 4/8/16)."""
    return ModelSpec(VitTrans, load_vit_weights, neck_mode="dense", head_prefix="bottleneck.",
                     classifier_key="classifier.weight")


@register("vit_b16_ms_light")
def vit_b16_ms_light() -> ModelSpec:
    """ViT-B/16 with the light (depthwise + shared pointwise) multi-scale neck."""
    return ModelSpec(VitTrans, load_vit_weights, neck_mode="light", head_prefix="bottleneck.",
                     classifier_key="classifier.weight")


@register("clip_b16")
def clip_b16() -> ModelSpec:
    """CLIP-ReID's ViT-B/16 image encoder on its projected 512-wide tokens: CLS -> BNNeck."""
    return ModelSpec(ClipVisual, load_clip_weights, head_prefix="bottleneck_proj.",
                     classifier_key="classifier_proj.weight")


@register("clip_b16_ms")
def clip_b16_ms() -> ModelSpec:
    """CLIP ViT-B/16 with the dense neck on the projected 512-wide tokens."""
    return ModelSpec(ClipVisual, load_clip_weights, neck_mode="dense", head_prefix="bottleneck_proj.",
                     classifier_key="classifier_proj.weight")


@register("clip_b16_ms_light")
def clip_b16_ms_light() -> ModelSpec:
    """CLIP ViT-B/16 with the light neck on the projected 512-wide tokens."""
    return ModelSpec(ClipVisual, load_clip_weights, neck_mode="light", head_prefix="bottleneck_proj.",
                     classifier_key="classifier_proj.weight")


@register("clip_b16_adapt_ms")
def clip_b16_adapt_ms() -> ModelSpec:
    """CLIP ViT-B/16, a DimAdapter 512 -> 768, then the dense neck at 768 (the ViT neck's width)."""
    return ModelSpec(ClipVisual, load_clip_weights, neck_mode="dense", adapt_dim=768)


@register("clip_b16_adapt_ms_light")
def clip_b16_adapt_ms_light() -> ModelSpec:
    """CLIP ViT-B/16, a DimAdapter 512 -> 768, then the light neck at 768."""
    return ModelSpec(ClipVisual, load_clip_weights, neck_mode="light", adapt_dim=768)


@register("vit_b16_jpm")
def vit_b16_jpm() -> ModelSpec:
    """TransReID's ViT-B/16 with the Jigsaw Patch Module: global + 4 local features, 3840-wide embedding."""
    return ModelSpec(VitTrans, load_jpm_weights, model=JPMReIDModel)


@register("vit_b16_ms_jpm")
def vit_b16_ms_jpm() -> ModelSpec:
    """ViT-B/16 JPM with the dense multi-scale neck on the global branch's tokens (see JPMReIDModel)."""
    return ModelSpec(VitTrans, load_jpm_weights, neck_mode="dense", model=JPMReIDModel)


@register("vit_b16_ms_rgbnt")
def vit_b16_ms_rgbnt() -> ModelSpec:
    """RGB/NIR/TIR: a shared ViT-B/16 and dense neck per modality, embeddings concatenated (3 x 768)."""
    return ModelSpec(VitTrans, load_multimodal_weights, neck_mode="dense", model=MultiModalReIDModel)


@register("clip_b16_ms_rgbnt")
def clip_b16_ms_rgbnt() -> ModelSpec:
    """RGB/NIR/TIR: a shared CLIP ViT-B/16 and dense neck on its 512-wide tokens, concatenated (3 x 512)."""
    return ModelSpec(ClipVisual, load_multimodal_weights, neck_mode="dense", model=MultiModalReIDModel)
