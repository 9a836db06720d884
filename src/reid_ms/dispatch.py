"""How a backbone's blocks and its attention run: the one place that decides, and says why.

A stack of transformer blocks takes one of four paths:

- ``"module"``: the blocks' own ``forward`` (``nn.Module`` calls, SDPA attention). Training, GPUs, other
  dtypes, autocast, hooks, ``torch.export``, ONNX export and ``torch.jit`` tracing see this path.
- ``"checkpointed"``: the module path with each block's activations recomputed in the backward
  (``set_grad_checkpointing(True)`` while autograd records).
- ``"fused"``: CPU fp32 inference through oneDNN's matrix products with fused bias, activation and
  residual (:mod:`reid_ms.kernels.blocks`); an :func:`~reid_ms.optimize_for_inference` model adds MKL's
  packed weights.
- ``"fused_op"``: the fused path as one custom op inside a ``torch.compile``'d graph
  (:mod:`reid_ms.kernels.compiled`).

Attention inside them: ``"per_image"`` (training on CPU, :class:`reid_ms.kernels.attention.PerImageAttention`),
``"explicit"`` (fused inference, short sequences), ``"sdpa"`` (``F.scaled_dot_product_attention``) or
``"in_op"`` (inside the compiled op, which picks explicit or SDPA when it runs).

:func:`block_path` decides for eager and compiled calls alike; :func:`attention_path` decides inside the
module path. Both read only their arguments and PyTorch's global state (grad mode, autocast, the
``torch.backends.mkldnn.enabled`` switch, the thread count, global hooks), and every condition is named in
the :class:`PathChoice` they return, so :func:`explain_path` can show a user what a call took and why.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# read once: dynamo cannot trace the availability functions (the `enabled` switch it can, and does)
MKLDNN_AVAILABLE = torch.backends.mkldnn.is_available()
MKL_PACKING_AVAILABLE = (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
                         and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))

# Longest sequence the fused path attends explicitly, image by image; longer ones go to SDPA's flash
# kernel, which needs no [heads, T, T] buffer and ties with the explicit form from about 200 tokens on
# (docs/performance.md has the measurements).
EXPLICIT_ATTENTION_MAX_TOKENS = 192

# Longest sequence whose training-time attention runs image by image (PerImageAttention).
PER_IMAGE_TRAINING_MAX_TOKENS = 256

# Thread counts (torch.get_num_threads()) at which the per-image attention forms are used. They beat
# SDPA's CPU kernel at 2 threads and lose at 1; above 4, one image's head products per call would leave
# threads idle where SDPA splits images x heads x query blocks (not measured, so SDPA is kept there).
PER_IMAGE_THREADS = range(2, 5)

BLOCK_PATHS = ("module", "checkpointed", "fused", "fused_op")
ATTENTION_PATHS = ("sdpa", "per_image", "explicit", "in_op")


@dataclass(frozen=True)
class PathChoice:
    """Which path a stack of blocks takes (:data:`BLOCK_PATHS`), its attention (:data:`ATTENTION_PATHS`)
    and why: ``reasons`` holds the conditions that decided, in the order they were checked."""

    blocks: str
    attention: str
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"blocks={self.blocks}, attention={self.attention}: " + "; ".join(self.reasons)


def _tracer() -> str | None:
    """The graph capture in progress that must see the module path (a portable graph of aten ops)."""
    if torch.compiler.is_exporting():
        return "torch.export"
    if torch.onnx.is_in_onnx_export():
        return "ONNX export"
    if torch.jit.is_tracing():
        return "torch.jit tracing"
    return None


def _hooked(blocks: nn.Module) -> bool:
    """Whether a forward hook would see the blocks' submodules run (the fused path calls none of them)."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in blocks.modules())


def _plain_cpu_fp32(t: torch.Tensor) -> bool:
    # under torch.compile the tensors are traced stand-ins: their type is not checked there
    plain = torch.compiler.is_compiling() or type(t) in (torch.Tensor, nn.Parameter)
    return plain and t.device.type == "cpu" and t.dtype == torch.float32 and t.layout == torch.strided


def _cpu_autocast() -> bool:
    return torch.is_autocast_enabled("cpu")


def fused_kernels_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why ``x @ weight.T`` may not go through oneDNN's inference kernels, or ``None`` when it may.

    They need plain fp32 CPU tensors, oneDNN enabled, no autograd graph being recorded (the kernels have
    no derivatives), no CPU autocast and no graph capture that must stay portable (:func:`_tracer`).
    """
    if torch.is_grad_enabled():
        return "autograd is recording (run inference under torch.no_grad() or torch.inference_mode())"
    tracer = _tracer()
    if tracer is not None:
        return f"{tracer} records the module path (a portable graph)"
    if _cpu_autocast():
        return "CPU autocast is on"
    if not isinstance(weight, torch.Tensor):
        return "the block weights are not tensors (e.g. quantised layers): their modules run"
    if not (_plain_cpu_fp32(x) and _plain_cpu_fp32(weight)):
        return (f"inputs {x.dtype} on {x.device.type}, weights {weight.dtype} on {weight.device.type}: the fused "
                f"kernels take plain fp32 CPU tensors")
    if not (MKLDNN_AVAILABLE and torch.backends.mkldnn.enabled):
        return "oneDNN is unavailable or disabled (torch.backends.mkldnn.enabled)"
    return None


def _per_image_threads() -> bool:
    return torch.get_num_threads() in PER_IMAGE_THREADS


def fused_attention_path(tokens: int) -> tuple[str, str]:
    """``("explicit" | "sdpa", reason)`` for the fused path's attention over ``tokens`` tokens."""
    if tokens > EXPLICIT_ATTENTION_MAX_TOKENS:
        return "sdpa", f"{tokens} tokens > {EXPLICIT_ATTENTION_MAX_TOKENS}: SDPA's flash kernel"
    if not _per_image_threads():
        return "sdpa", f"{torch.get_num_threads()} threads (explicit attention at {PER_IMAGE_THREADS.start}-"\
                       f"{PER_IMAGE_THREADS.stop - 1}): SDPA"
    return "explicit", f"{tokens} tokens, {torch.get_num_threads()} threads: explicit attention image by image"


def attention_path(qkv: torch.Tensor, dropout_p: float = 0.0) -> tuple[str, str]:
    """``("per_image" | "sdpa", reason)`` for the module path's attention on ``qkv`` ``[B, T, 3D]``.

    Per image (with its own backward) only while autograd records on a plain fp32 CPU tensor, outside
    autocast, graph capture and ``torch.func`` transforms (those need SDPA's derivative rules), without
    attention dropout, with at most :data:`PER_IMAGE_TRAINING_MAX_TOKENS` tokens and at
    :data:`PER_IMAGE_THREADS` threads.
    """
    if dropout_p:
        return "sdpa", "attention dropout"
    if not (torch.is_grad_enabled() and qkv.requires_grad):
        return "sdpa", "no gradient needed"
    if torch.compiler.is_compiling():
        return "sdpa", "torch.compile traces SDPA"
    why = _tracer()
    if why is None and not _plain_cpu_fp32(qkv):
        why = f"{qkv.dtype} on {qkv.device.type}"
    if why is None and _cpu_autocast():
        why = "CPU autocast"
    if why is None and torch._C._are_functorch_transforms_active():
        why = "torch.func transform"
    if why is None and qkv.shape[1] > PER_IMAGE_TRAINING_MAX_TOKENS:
        why = f"{qkv.shape[1]} tokens > {PER_IMAGE_TRAINING_MAX_TOKENS}"
    if why is None and not _per_image_threads():
        why = f"{torch.get_num_threads()} threads"
    if why is not None:
        return "sdpa", why
    return "per_image", f"training on CPU, {qkv.shape[1]} tokens: attention image by image"


def block_path(x: torch.Tensor, owner: nn.Module, blocks: nn.Module, weight: torch.Tensor) -> PathChoice:
    """The path of ``blocks`` (owned by the backbone ``owner``) on tokens ``x`` ``[B, T, D]``.

    ``weight`` is one of the blocks' weights (its dtype and device decide with ``x``'s). The same
    function decides eager and compiled calls; being compiled only turns ``"fused"`` into ``"fused_op"``.
    """
    if owner.grad_checkpointing and torch.is_grad_enabled():
        return PathChoice("checkpointed", _module_attention(x, weight),
                          ("grad checkpointing is on and autograd is recording",))
    why = None
    if not owner.fused_inference:
        why = "fused inference is off (set_fused_inference(False))"
    elif owner.training:
        why = "train mode"
    else:
        why = fused_kernels_reason(x, weight)
    if why is None and _hooked(blocks):
        why = "forward hooks on the blocks (the fused path calls none of their submodules)"
    if why is not None:
        return PathChoice("module", _module_attention(x, weight), (why,))
    if torch.compiler.is_compiling():
        # the op picks its attention when it runs (dynamo cannot read the thread count)
        return PathChoice("fused_op", "in_op", ("inference on fp32 CPU, compiled: one custom op",))
    attention, reason = fused_attention_path(x.shape[1])
    return PathChoice("fused", attention, ("inference on fp32 CPU", reason))


def _module_attention(x: torch.Tensor, weight: torch.Tensor) -> str:
    """What :func:`attention_path` will pick inside the module path's blocks on tokens like ``x``."""
    if torch.compiler.is_compiling():
        return "sdpa"
    # the q/k/v product needs a gradient when the tokens or the weights do; a view carries the flag
    weight_grad = isinstance(weight, torch.Tensor) and weight.requires_grad
    probe = x.detach().requires_grad_(torch.is_grad_enabled() and (x.requires_grad or weight_grad))
    return attention_path(probe)[0]


_recording = threading.local()


def record(choice: PathChoice) -> None:
    """Hand ``choice`` to the :func:`explain_path` call in progress on this thread, if any."""
    if torch.compiler.is_compiling():
        return
    log = getattr(_recording, "log", None)
    if log is not None:
        log.append(choice)


@contextlib.contextmanager
def _recorder() -> Iterator[list[PathChoice]]:
    outer = getattr(_recording, "log", None)
    log: list[PathChoice] = []
    _recording.log = log
    try:
        yield log
    finally:
        _recording.log = outer


def explain_path(model: nn.Module, *args: Any, **kwargs: Any) -> list[PathChoice]:
    """Run ``model(*args, **kwargs)`` once and return, for each stack of blocks it ran, the path taken and why.

    Call it the way the real call is made (inside ``torch.no_grad()``, under autocast, at the same thread
    count): the decision depends on that state. A multi-modal model lists one choice per modality.

    >>> with torch.no_grad():
    ...     print(reid_ms.explain_path(model.eval(), images))   # doctest: +SKIP
    [PathChoice(blocks='fused', attention='explicit', reasons=('inference on fp32 CPU', ...))]
    """
    with _recorder() as log:
        model(*args, **kwargs)
    return list(log)
