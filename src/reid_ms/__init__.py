"""reid_ms: re-identification backbones and necks with one call signature.

``VitTrans`` (TransReID's ViT) and ``ClipVisual`` (CLIP-ReID's visual encoder) take the same
``forward(images, cam_label=None, view_label=None)`` and return every token; the necks take any width
and any grid; ``build(name)`` assembles named backbone + neck + head models.
"""

from reid_ms import metrics
from reid_ms.backbones.clip import ClipVisual
from reid_ms.backbones.vit import VitTrans
from reid_ms.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    ReidMsError,
    UnsafeCheckpointError,
    InferenceModelError,
)
from reid_ms.dispatch import PathChoice, explain_path
from reid_ms.distributed import convert_sync_batchnorm
from reid_ms.export import export_onnx, export_program
from reid_ms.extractor import BoxMOTAdapter, FeatureExtractor
from reid_ms.quantize import quantize
from reid_ms.heads import BNNeckHead
from reid_ms.heads.multibranch import MultiBranchBNNeckHead
from reid_ms.inference import InferenceModel, optimize_for_inference
from reid_ms.model import ReIDModel
from reid_ms.models import JPMReIDModel, MultiModalReIDModel
from reid_ms.models.multimodal import load_multimodal_weights
from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow
from reid_ms.necks.jpm import JigsawPatchNeck
from reid_ms.registry import ModelSpec, build, list_models, register
from reid_ms.weights._common import LoadReport
from reid_ms.weights.clip import load_clip_weights
from reid_ms.weights.jpm import load_jpm_weights
from reid_ms.weights.vit import load_vit_weights

__version__ = "0.1.0"

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
    # export, metrics
    "export_onnx", "export_program", "metrics",
    # errors
    "ReidMsError", "ConfigError", "InputError", "CheckpointError", "CheckpointNotFoundError",
    "UnsafeCheckpointError", "InferenceModelError",
    # how the blocks run, and the frozen inference copy
    "explain_path", "PathChoice", "optimize_for_inference", "InferenceModel",
    # retrieval and deployment
    "FeatureExtractor", "BoxMOTAdapter", "quantize",
]
