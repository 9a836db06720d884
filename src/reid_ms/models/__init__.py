"""Built models: :class:`ReIDModel` (backbone -> adapter -> neck -> BNNeck) and those whose structure goes
beyond it, all with timm's ``forward_features`` / ``forward_head`` split (see :mod:`reid_ms.models.base`).

:class:`JPMReIDModel`: TransReID's Jigsaw Patch Module, five branch features. :class:`MultiModalReIDModel`:
one shared backbone over RGB, near-infrared and thermal images, embeddings concatenated.
"""

from reid_ms.models.base import BuiltModel, ReIDModel
from reid_ms.models.jpm import JPMReIDModel
from reid_ms.models.multimodal import MultiModalReIDModel

__all__ = ["BuiltModel", "ReIDModel", "JPMReIDModel", "MultiModalReIDModel"]
