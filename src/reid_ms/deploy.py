"""int8 inference on the CPU: ``reid_ms.quantize(model)``.

    qmodel = reid_ms.quantize(model)                        # ONNX Runtime, int8 weights and activations
    emb = qmodel(images, cam_label=cams)                   # [B, feat_dim], like model(...) in eval mode
    qmodel = reid_ms.quantize(model, backend="torch")      # PyTorch's dynamic int8 linear layers instead

Both quantise the linear layers dynamically: weights to int8 once, activations per call. The default
exports the model to ONNX (:func:`reid_ms.export_onnx`) and quantises the graph with
``onnxruntime.quantization.quantize_dynamic`` (``MatMulInteger``, which uses AVX-512 VNNI where the CPU has
it); ``backend="torch"`` replaces every ``nn.Linear`` of a copy of the model with
``torch.ao.nn.quantized.dynamic.Linear`` and needs no extra package. Which is faster, and by how much, is
measured in ``bench/bench_deploy.py`` (docs/retrieval.md). The result is a separate inference object; the
model passed in is not changed.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from reid_ms.backbones._common import Label
from reid_ms.errors import ConfigError, InputError
from reid_ms.export import export_onnx
from reid_ms.models import BuiltModel, MultiModalReIDModel

__all__ = ["quantize", "OnnxRuntimeModel", "BACKENDS"]

BACKENDS = ("onnxruntime", "torch")


class OnnxRuntimeModel:
    """An ONNX graph of a reid_ms model run by ONNX Runtime, called like the model in eval mode.

    ``model(images [B, C, H, W], cam_label=None, view_label=None) -> [B, feat_dim]`` float32 CPU tensor.
    Attributes copied from the source model: ``feat_dim``, ``pretrained_cfg``, ``model_name``,
    ``camera_num``, ``view_num``.

    Args:
        onnx_model: the serialised graph (bytes) or a path to an ``.onnx`` file.
        source: the model it was exported from (read for its attributes only; no reference is kept).
        threads: ONNX Runtime's intra-op threads; ``None``: ``torch.get_num_threads()``.
    """

    def __init__(self, onnx_model: bytes | str | os.PathLike, source: BuiltModel, threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        model = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
        self.session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.feat_dim, self.model_name = source.feat_dim, source.model_name
        self.pretrained_cfg = getattr(source, "pretrained_cfg", None)
        self.camera_num = int(getattr(source.backbone, "camera_num", 0))
        self.view_num = int(getattr(source.backbone, "view_num", 0))

    def __call__(self, images: torch.Tensor, cam_label: Label = None, view_label: Label = None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise InputError(f"expected images [B, C, H, W] as a tensor, got {getattr(images, 'shape', type(images))}")
        batch = images.shape[0]
        feed = {"images": images.detach().float().cpu().numpy()}
        for name, label, count in (("cam_label", cam_label, self.camera_num), ("view_label", view_label, self.view_num)):
            if count == 0:
                if label is not None:
                    raise InputError(f"this model was built without a table for {name}; call it without {name}")
                continue
            if label is None:
                raise InputError(f"this model needs {name} (one integer in [0, {count - 1}] per image)")
            values = torch.as_tensor(label, dtype=torch.long).cpu()
            values = values.expand(batch) if values.dim() == 0 else values
            if values.shape != (batch,) or int(values.min()) < 0 or int(values.max()) >= count:
                raise InputError(f"{name} must hold {batch} integers in [0, {count - 1}], got {label!r}")
            feed[name] = values.numpy().astype(np.int64)
        return torch.from_numpy(self.session.run(None, feed)[0])


def _onnxruntime_int8(model: BuiltModel, threads: int | None) -> OnnxRuntimeModel:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ConfigError(f"quantize(backend='onnxruntime') needs onnxruntime, onnx and onnxscript ({exc}); pip "
                          f"install 'reid-ms[dev]', or use backend='torch'") from exc
    with tempfile.TemporaryDirectory(prefix="reid_ms_quantize_") as tmp:
        fp32, int8 = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model.int8.onnx")
        export_onnx(model, fp32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        with open(int8, "rb") as f:
            graph = f.read()
    return OnnxRuntimeModel(graph, model, threads)


def _torch_int8(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    copied = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which is not a dependency here
        warnings.simplefilter("ignore")
        return quantize_dynamic(copied, {nn.Linear}, dtype=torch.qint8)


def quantize(model: nn.Module, backend: str = "onnxruntime", threads: int | None = None) -> Any:
    """An int8 inference copy of ``model`` (a model from :func:`~reid_ms.build`), called like it in eval mode.

    Args:
        model: the fp32 model; it is put in eval mode and otherwise left unchanged.
        backend: ``"onnxruntime"`` (an :class:`OnnxRuntimeModel` running the int8-quantised ONNX graph) or
            ``"torch"`` (a copy of the model with dynamic int8 ``nn.Linear`` layers; CPU only).
        threads: ONNX Runtime's intra-op threads (``None``: ``torch.get_num_threads()``).

    Returns:
        ``qmodel(images [B, C, H, W], cam_label=None, view_label=None) -> [B, feat_dim]``.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(model, MultiModalReIDModel):
        raise ConfigError("quantize takes single-image models; export a multi-modal model with reid_ms.export_onnx "
                          "and quantise the graph with onnxruntime.quantization")
    if not isinstance(model, BuiltModel):
        raise ConfigError(f"quantize expects a model from reid_ms.build, got {type(model).__name__}")
    if next(model.parameters()).device.type != "cpu":
        raise ConfigError("int8 quantisation here targets the CPU; move the model with model.cpu() first")
    model.eval()
    if backend == "torch":
        return _torch_int8(model)
    return _onnxruntime_int8(model, threads)
