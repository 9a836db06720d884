"""reid_ms: re-identification backbones and necks with one call signature.

``VitTrans`` (TransReID's ViT) and ``ClipVisual`` (CLIP-ReID's visual encoder) take the same
``forward(images, cam_label=None, view_label=None)`` and return every token; the necks take any width
and any grid; ``build(name)`` assembles named backbone + neck + head models.

The public names are imported on first use (``reid_ms.VitTrans`` imports torch and the backbone then),
so ``import reid_ms`` and the ``reid-ms`` command's ``--help``, ``--version`` and ``list`` start at once.
"""

import typing

from reid_ms.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    ReidMsError,
    UnsafeCheckpointError,
    InferenceModelError,
)

__version__ = "0.1.0"

# the public submodules, imported on first use like the names below
_SUBMODULES = ("data", "losses", "metrics", "optim", "training", "testing", "search", "visualize", "clipreid")

# public name -> the module that defines it
_LAZY = {
    "VitTrans": "reid_ms.backbones.vit",
    "ClipVisual": "reid_ms.backbones.clip",
    "load_vit_weights": "reid_ms.weights.vit",
    "load_clip_weights": "reid_ms.weights.clip",
    "load_jpm_weights": "reid_ms.weights.jpm",
    "load_multimodal_weights": "reid_ms.weights.multimodal",
    "LoadReport": "reid_ms.weights._common",
    "MultiScaleSlidingWindow": "reid_ms.necks",
    "DimAdapter": "reid_ms.necks",
    "JigsawPatchNeck": "reid_ms.necks.jpm",
    "BNNeckHead": "reid_ms.heads",
    "MultiBranchBNNeckHead": "reid_ms.heads.multibranch",
    "ReIDModel": "reid_ms.models",
    "JPMReIDModel": "reid_ms.models",
    "MultiModalReIDModel": "reid_ms.models",
    "ModelSpec": "reid_ms.registry",
    "build": "reid_ms.registry",
    "list_models": "reid_ms.registry",
    "register": "reid_ms.registry",
    "convert_sync_batchnorm": "reid_ms.distributed",
    "export_onnx": "reid_ms.export",
    "export_program": "reid_ms.export",
    "ClipText": "reid_ms.backbones.clip_text",
    "PromptLearner": "reid_ms.backbones.clip_text",
    "explain_path": "reid_ms.dispatch",
    "PathChoice": "reid_ms.dispatch",
    "optimize_for_inference": "reid_ms.inference",
    "InferenceModel": "reid_ms.inference",
    "sample_data": "reid_ms.samples",
    "SampleData": "reid_ms.samples",
    "FeatureExtractor": "reid_ms.extractor",
    "BoxMOTAdapter": "reid_ms.extractor",
    "quantize": "reid_ms.deploy",
}

if typing.TYPE_CHECKING:  # what type checkers and editors see; _LAZY must name the same modules (tested)
    from reid_ms import data, losses, metrics, optim, search, training, visualize
    from reid_ms.backbones.clip_text import ClipText, PromptLearner
    from reid_ms.dispatch import PathChoice, explain_path
    from reid_ms.inference import InferenceModel, optimize_for_inference
    from reid_ms.backbones.clip import ClipVisual
    from reid_ms.backbones.vit import VitTrans
    from reid_ms.distributed import convert_sync_batchnorm
    from reid_ms.export import export_onnx, export_program
    from reid_ms.heads import BNNeckHead
    from reid_ms.heads.multibranch import MultiBranchBNNeckHead
    from reid_ms.models import JPMReIDModel, MultiModalReIDModel, ReIDModel
    from reid_ms.weights.multimodal import load_multimodal_weights
    from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow
    from reid_ms.necks.jpm import JigsawPatchNeck
    from reid_ms.deploy import quantize
    from reid_ms.extractor import BoxMOTAdapter, FeatureExtractor
    from reid_ms.registry import ModelSpec, build, list_models, register
    from reid_ms.samples import SampleData, sample_data
    from reid_ms.weights._common import LoadReport
    from reid_ms.weights.clip import load_clip_weights
    from reid_ms.weights.jpm import load_jpm_weights
    from reid_ms.weights.vit import load_vit_weights


def __getattr__(name: str) -> object:
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name.isidentifier() and importlib.util.find_spec(f"{__name__}.{name}") is not None:  # reid_ms.metrics
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES})


__all__ = [
    # backbones: one call signature, every token back
    "VitTrans", "ClipVisual",
    # weights
    "load_vit_weights", "load_clip_weights", "load_jpm_weights", "load_multimodal_weights", "LoadReport",
    # necks and heads
    "MultiScaleSlidingWindow", "DimAdapter", "JigsawPatchNeck", "BNNeckHead", "MultiBranchBNNeckHead",
    # models and the registry
    "ReIDModel", "JPMReIDModel", "MultiModalReIDModel", "ModelSpec", "build", "list_models", "register",
    # distributed training
    "convert_sync_batchnorm",
    # export, metrics, training parts
    "export_onnx", "export_program", "metrics", "data", "losses", "optim", "training",
    # errors
    "ReidMsError", "ConfigError", "InputError", "CheckpointError", "CheckpointNotFoundError",
    "UnsafeCheckpointError", "InferenceModelError",
    # how the blocks run, and the frozen inference copy
    "explain_path", "PathChoice", "optimize_for_inference", "InferenceModel",
    # CLIP-ReID's text side
    "ClipText", "PromptLearner",
    # the sample set shipped with the package
    "sample_data", "SampleData",
    # retrieval and deployment
    "FeatureExtractor", "BoxMOTAdapter", "quantize", "search", "visualize",
]
