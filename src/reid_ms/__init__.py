"""reid_ms: re-identification backbones and necks with one call signature.

``VitTrans`` (TransReID's ViT) and ``ClipVisual`` (CLIP-ReID's visual encoder) take the same
``forward(images, cam_label=None, view_label=None)`` and return every token; the necks take any width
and any grid; ``build(name)`` assembles named backbone + neck + head models.
"""

from reid_ms.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    InputError,
    ReidMsError,
    UnsafeCheckpointError,
)
from reid_ms.weights._common import LoadReport

__version__ = "0.1.0"

# -- public API (each module adds its names below) --
from reid_ms import metrics  # noqa: E402  (reid_ms.metrics.evaluate)
from reid_ms.heads import BNNeckHead  # noqa: E402
from reid_ms.necks import DimAdapter, MultiScaleSlidingWindow  # noqa: E402
from reid_ms.backbones.vit import VitTrans  # noqa: E402
from reid_ms.weights.vit import load_vit_weights  # noqa: E402
from reid_ms.backbones.clip import ClipVisual  # noqa: E402
from reid_ms.weights.clip import load_clip_weights  # noqa: E402
from reid_ms.model import ReIDModel  # noqa: E402
from reid_ms.registry import ModelSpec, build, list_models, register  # noqa: E402
from reid_ms.export import export_onnx, export_program  # noqa: E402
from reid_ms.necks.jpm import JigsawPatchNeck  # noqa: E402
from reid_ms.heads.multibranch import MultiBranchBNNeckHead  # noqa: E402
from reid_ms.models import JPMReIDModel, MultiModalReIDModel  # noqa: E402
from reid_ms.models.multimodal import load_multimodal_weights  # noqa: E402
from reid_ms.weights.jpm import load_jpm_weights  # noqa: E402
