"""Heads: what turns a pooled token into an embedding (and class logits when training)."""

from reid_ms.heads.bnneck import BNNeckHead

__all__ = ["BNNeckHead"]
