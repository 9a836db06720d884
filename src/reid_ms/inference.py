"""A frozen copy of a model for CPU inference, with its block weights packed once: :func:`optimize_for_inference`.

A trainable model never keeps derived copies of its weights: its fused CPU path reads the weights on every
call, so nothing can go stale. The fastest CPU kernels need the block weights reordered into MKL's packed
layout, a copy that would go stale the moment the weights change. Those copies therefore live only in the
object the user asks for here: a snapshot of the model, taken at the call, that cannot train and whose
weights cannot be changed (it has no parameters to hand out, refuses ``train()``, ``load_state_dict`` and
dtype or device conversions, and raises if a frozen weight is still written to through its private copy).
To run new weights, call :func:`optimize_for_inference` again.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NoReturn

import torch
from torch import nn

from reid_ms.backbones._common import BlockBackbone
from reid_ms.dispatch import MKL_PACKING_AVAILABLE
from reid_ms.errors import ConfigError, InferenceModelError
from reid_ms.kernels.blocks import PackedWeights, using_packed_weights

_HOW = "build it again from the changed model with reid_ms.optimize_for_inference(model)"


class InferenceModel(nn.Module):
    """A frozen, eval-mode snapshot of a model whose CPU fp32 inference runs on packed block weights.

    Called like the model it was made from (``im(images, cam_label=...)``), under ``torch.no_grad()``.
    It exposes no parameters or state; the snapshot sits outside the module tree on purpose, so no
    optimizer, ``load_state_dict``, ``.to()`` or ``.apply()`` can reach its weights.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        snapshot = copy.deepcopy(model).eval().requires_grad_(False)
        backbones = [m for m in snapshot.modules() if isinstance(m, BlockBackbone)]
        if not backbones:
            raise ConfigError(f"optimize_for_inference found no reid_ms backbone (VitTrans, ClipVisual) in "
                              f"{type(model).__name__}; pass a built model or a backbone")
        for backbone in backbones:
            backbone.fused_inference = True  # the point of the copy, whatever the original was set to
        object.__setattr__(self, "_snapshot", snapshot)
        packs = {b: PackedWeights() for b in backbones} if MKL_PACKING_AVAILABLE else {}
        object.__setattr__(self, "_packs", packs)

    @property
    def model(self) -> nn.Module:
        """The frozen snapshot (read-only use: changing it makes the next call raise)."""
        return self._snapshot

    @property
    def packed_weights(self) -> Mapping[nn.Module, PackedWeights]:
        """Each backbone's packed copies (empty on builds without MKL, which run oneDNN's kernels)."""
        return self._packs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), using_packed_weights(self._packs):
            return self._snapshot(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # the snapshot's read-only descriptions (feat_dim, grid_size, img_size, ...) answer as the model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_snapshot"], name)

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise InferenceModelError(f"a model made by optimize_for_inference cannot train; train the original "
                                      f"model, then {_HOW}")
        return self

    def _refuse(self, what: str) -> NoReturn:
        raise InferenceModelError(f"a model made by optimize_for_inference is frozen: {what} is refused; {_HOW}")

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> NoReturn:
        self._refuse("load_state_dict")

    def _apply(self, fn: Any, recurse: bool = True) -> NoReturn:  # .to(), .double(), .half(), any device move
        self._refuse("converting its dtype or device")

    def __getstate__(self) -> dict[str, Any]:
        # packed copies are derived, and MKL's layout is this machine's: a copy or an unpickled model packs anew
        state = self.__dict__.copy()
        state["_packs"] = {backbone: PackedWeights() for backbone in self._packs}
        return state

    def extra_repr(self) -> str:
        copies = sum(len(p) for p in self._packs.values())
        return f"{type(self._snapshot).__name__}, frozen, {copies} packed weight copies"


def optimize_for_inference(model: nn.Module) -> InferenceModel:
    """A frozen snapshot of ``model`` (a built model or a backbone) for fast CPU fp32 inference.

    Its blocks run MKL's products on weights packed once per batch shape (oneDNN's fused kernels on builds
    without MKL); outputs equal the model's within float rounding. The snapshot costs the model's size in
    memory, the packed copies about the block weights' size again. It cannot train, and its weights cannot
    change: after changing the model's, call this again.
    """
    if isinstance(model, InferenceModel):
        return model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"optimize_for_inference takes a torch.nn.Module, got {type(model).__name__}")
    return InferenceModel(model)
