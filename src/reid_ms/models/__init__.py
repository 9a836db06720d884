"""Models whose structure goes beyond backbone -> neck -> BNNeck (:class:`reid_ms.ReIDModel`).

:class:`JPMReIDModel`: TransReID's Jigsaw Patch Module, five branch features. :class:`MultiModalReIDModel`:
one shared backbone over RGB, near-infrared and thermal images, embeddings concatenated.
"""

from reid_ms.models.jpm import JPMReIDModel
from reid_ms.models.multimodal import MultiModalReIDModel

__all__ = ["JPMReIDModel", "MultiModalReIDModel"]
