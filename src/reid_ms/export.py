"""Export a built model with its camera/view labels as graph inputs: ``torch.export`` and ONNX.

    program = export_program(model)                    # torch.export.ExportedProgram
    emb = program.module()(images, cam_label=cams)     # any batch size
    names = export_onnx(model, "model.onnx")           # ["images", "cam_label"]
    err = onnx_max_error(model, "model.onnx")          # onnxruntime vs PyTorch, max abs difference

The graphs take exactly the inputs the model needs: the images (``images``; for a
:class:`~reid_ms.MultiModalReIDModel` one batch per modality, named after it: ``rgb``, ``nir``,
``tir``), ``cam_label`` when it was built with ``camera_num > 0``, ``view_label`` when ``view_num > 0``
(int64, one per image). The batch dimension is dynamic and shared by all inputs. The exported
computation is the eval-mode embedding ``[B, feat_dim]``; label range checks are eager-only (see
``reid_ms.backbones._common``), so an exported graph trusts its labels.
"""

from __future__ import annotations

import inspect
import os
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from reid_ms.errors import ConfigError, InputError
from reid_ms.models.base import BuiltModel, pack_call, random_inputs

__all__ = ["example_inputs", "call_args", "export_program", "export_onnx", "onnx_max_error"]

# Batch of the example inputs traced; 1 would let the exporter specialise the batch dimension to a constant.
EXAMPLE_BATCH = 2


def example_inputs(model: nn.Module, batch: int = EXAMPLE_BATCH,
                   generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """Random inputs the model accepts, by graph input name.

    A built model describes its own (``model.example_inputs``); a bare backbone takes ``"images"``.

    Returns:
        ``{"images": [batch, C, img_h, img_w] float32}`` (a multi-modal model: ``"rgb"``, ``"nir"``,
        ``"tir"``, each of that shape), plus ``"cam_label"`` / ``"view_label"`` ``[batch]`` int64 in
        range for the tables the model was built with. :func:`call_args` turns them into the call.
    """
    if isinstance(model, BuiltModel):
        return model.example_inputs(batch, generator)
    return random_inputs(model, ("images",), batch, generator, next(model.parameters()).device)


def call_args(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[tuple[Any], dict[str, torch.Tensor]]:
    """Graph inputs by name (as :func:`example_inputs` returns them) -> ``(args, kwargs)`` of ``model(...)``.

    ``model(*args, **kwargs)`` is ``model(images, cam_label=..., view_label=...)``, or for a multi-modal
    model ``model({"rgb": ..., "nir": ..., "tir": ...}, cam_label=..., ...)``.
    """
    return pack_call(getattr(model, "image_names", ("images",)), inputs)


def _args(model: nn.Module) -> tuple[tuple[Any], dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """Traced ``(args, kwargs)``, their dynamic shapes (by ``forward``'s argument names) and the input names."""
    inputs = example_inputs(model)
    args, kwargs = call_args(model, inputs)
    batch = torch.export.Dim("batch", min=1)
    first = next(iter(inspect.signature(model.forward).parameters))
    images = args[0]
    dynamic = {first: {m: {0: batch} for m in images} if isinstance(images, dict) else {0: batch},
               **{name: {0: batch} for name in kwargs}}
    return args, kwargs, dynamic, list(inputs)


def export_program(model: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` the eval-mode ``model`` with a dynamic batch and its labels as keyword inputs.

    ``model`` is a model from :func:`~reid_ms.build` (or a backbone) and is put in eval mode. Call the
    result as the model: ``program.module()(images, cam_label=cams, view_label=views)``, or with the dict
    of modality batches for a :class:`~reid_ms.MultiModalReIDModel`.
    """
    args, kwargs, dynamic, _ = _args(model.eval())
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic)


def export_onnx(model: nn.Module, path: str | os.PathLike, opset: int = 18) -> list[str]:
    """Write the eval-mode ``model`` to the ONNX file ``path``; returns the graph's input names.

    Inputs ``images`` ``[batch, C, img_h, img_w]`` float32 (a multi-modal model: one such input per
    modality, ``rgb``, ``nir``, ``tir``) and, where the model has the tables, ``cam_label`` /
    ``view_label`` ``[batch]`` int64; output ``features`` ``[batch, feat_dim]``. Uses
    ``torch.onnx.export``'s ``torch.export``-based exporter, which needs the packages ``onnx`` and
    ``onnxscript`` (the ``dev`` extra).
    """
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs both; say so before tracing)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the packages onnx and onnxscript ({exc}); "
                          f"pip install 'reid-ms[dev]'") from exc
    args, kwargs, dynamic, names = _args(model.eval())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        # the exporter warns that it renames the batch axis the inputs share: expected here
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
        torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names, output_names=["features"],
                          dynamic_shapes=dynamic, opset_version=opset, external_data=False, verbose=False)
    return names


def onnx_max_error(model: nn.Module, path: str | os.PathLike, batch: int = 3, seed: int = 0) -> float:
    """Largest absolute difference between onnxruntime running ``path`` and the eval-mode ``model``.

    Both get the same random inputs (:func:`example_inputs` with ``batch`` images, seeded by ``seed``);
    use a batch size other than the traced one (2) to exercise the dynamic dimension.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"checking an ONNX file needs onnxruntime ({exc}); pip install 'reid-ms[dev]'") from exc
    inputs = example_inputs(model, batch, torch.Generator().manual_seed(seed))
    args, kwargs = call_args(model, inputs)
    with torch.inference_mode():
        expected = model.eval()(*args, **kwargs).float().cpu().numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    if sorted(wanted) != sorted(inputs):
        raise InputError(f"{str(path)!r} takes the inputs {wanted} where the model takes {list(inputs)}; it was "
                         f"exported from another model")
    got = session.run(None, {name: t.cpu().numpy() for name, t in inputs.items()})[0]
    if got.shape != expected.shape:
        raise InputError(f"{str(path)!r} returns features of shape {got.shape} where the model returns "
                         f"{expected.shape}; it was exported from another model")
    return float(np.abs(got - expected).max())
