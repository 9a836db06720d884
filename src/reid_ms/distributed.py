"""Synchronized BatchNorm for every device: PyTorch's on GPUs, an all-reduce version on the CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors in training mode (``ValueError: SyncBatchNorm expected
input tensor to be on GPU ...``) and ``DistributedDataParallel`` refuses a CPU model holding one, so a
BNNeck could not see the global batch in a gloo run. :class:`SyncBatchNorm` here runs PyTorch's own
forward on the devices PyTorch supports and computes the global statistics with differentiable
all-reduces everywhere else.
"""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
import torch.distributed as dist
from torch import nn

from reid_ms.errors import InputError

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over a process group: the backward pass sums the output gradients of every process.

    ``torch.distributed.nn.functional.all_reduce`` computes the same but warns that it is deprecated
    (torch 2.14), and its named replacement in ``torch.distributed._functional_collectives`` is private
    and differentiable only in recent releases; this needs nothing but ``dist.all_reduce``.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _torch_syncs_on(device_type: str) -> bool:
    """Whether ``torch.nn.SyncBatchNorm`` synchronizes tensors of this device type (the list of its forward)."""
    return device_type in ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of every process of a group, on any device.

    Input ``[N, C, *]`` (``[B, C]`` for a BNNeck, ``[B, C, H, W]`` for a feature map), output the same shape.

    - Tensors on a device PyTorch's SyncBatchNorm supports (CUDA, HPU, XPU, the privateuse1 backend):
      ``torch.nn.SyncBatchNorm.forward`` runs on this module, so the result is PyTorch's exactly.
    - Elsewhere (the CPU with gloo), in training mode with a process group of more than one process:
      the global mean and biased variance normalise the input; ``running_mean`` / ``running_var``
      take the global mean and unbiased variance with BatchNorm's momentum (``momentum=None``: the
      cumulative average), and ``num_batches_tracked`` counts the step. Processes may hold batches of
      different sizes (the element count is all-reduced too).
    - Eval mode, no initialised process group, or a group of one process: exactly BatchNorm.

    The CPU statistics are reduced in float64 with two all-reduces: first each channel's element
    count and sum (giving the global mean), then the sum of squared deviations from that global mean.
    This is the two-pass variance of the concatenated batch, free of the cancellation of
    ``E[x^2] - E[x]^2`` when a channel's mean is large against its spread; the second collective costs
    ``C`` more float64 values. Both all-reduces are differentiable (the backward pass all-reduces too),
    so the gradients flowing into the statistics are summed over the processes: the input gradient is
    that of one BatchNorm over the global batch for the sum of the per-process losses. Like PyTorch's,
    every process of the group must call the forward the same number of times.

    Parameters, buffers and their state-dict keys are BatchNorm's (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so checkpoints move freely between a
    converted model and a plain one. It is not a subclass of ``torch.nn.SyncBatchNorm``:
    ``DistributedDataParallel`` refuses to wrap a CPU model holding one.

    Args:
        num_features: channels ``C``.
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm1d``.
        process_group: the group whose processes share statistics; ``None``: the default (world) group.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[Any] = None, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise InputError(f"SyncBatchNorm expects input [N, C, *] of at least 2 dimensions, got shape "
                             f"{tuple(input.shape)}")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise InputError(f"SyncBatchNorm expects C = {self.num_features} channels, got 0 (shape "
                             f"{tuple(input.shape)})")

    def _sync_group(self) -> Optional[Any]:
        """The group to all-reduce over in this forward call, or ``None`` when BatchNorm's own statistics do."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``[N, C, *]`` -> ``[N, C, *]``, normalised with the statistics of every process's batch in training."""
        if _torch_syncs_on(input.device.type):  # self has every attribute torch's forward reads
            return nn.SyncBatchNorm.forward(cast(nn.SyncBatchNorm, self), input)
        group = self._sync_group()
        if group is None:
            return super().forward(input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return self._all_reduce_forward(input, group)

    def _all_reduce_forward(self, input: torch.Tensor, group: Any) -> torch.Tensor:
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.to(torch.float64)
        count = torch.full((1,), input.numel() / channels, dtype=torch.float64, device=input.device)
        count_sum = _AllReduceSum.apply(torch.cat([count, x.sum(dims)]), group)
        total = count_sum[0].item()
        if total < 2:
            raise InputError(f"SyncBatchNorm in training mode needs more than 1 value per channel over all "
                             f"processes, got {total:.0f} (input {tuple(input.shape)} here); call .eval() for "
                             f"inference or use larger batches")
        view = (1, channels) + (1,) * (input.dim() - 2)
        mean = count_sum[1:] / total
        centered = x - mean.view(view)
        var = _AllReduceSum.apply(centered.square().sum(dims), group) / total

        if self.track_running_stats:
            assert (self.num_batches_tracked is not None and self.running_mean is not None
                    and self.running_var is not None)  # BatchNorm's buffers when it tracks running statistics
            self.num_batches_tracked.add_(1)
            factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
            with torch.no_grad():  # BatchNorm's update, in float64 as its CPU kernel does
                unbiased = var * (total / (total - 1))
                for buffer, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
                    buffer.copy_(factor * batch + (1 - factor) * buffer.to(torch.float64))

        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(torch.float64)
        out = centered * scale.view(view)
        if self.bias is not None:
            out = out + self.bias.to(torch.float64).view(view)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[Any] = None) -> nn.Module:
    """Replace every BatchNorm in ``module`` by a :class:`SyncBatchNorm` sharing its parameters and buffers.

    Converts ``nn.BatchNorm1d``, ``nn.BatchNorm2d``, ``nn.BatchNorm3d`` and ``torch.nn.SyncBatchNorm``
    layers (the BNNeck of every reid_ms head among them). The new layer holds the same ``Parameter``
    and buffer objects, so ``requires_grad`` (the BNNeck's frozen bias), optimizer references and the
    state-dict keys are unchanged, as are the training flag and the device. Call it before wrapping the
    model in ``DistributedDataParallel``.

    Args:
        module: a model, or a single BatchNorm layer.
        process_group: the group whose processes share statistics; ``None``: the world group.

    Returns:
        ``module`` itself with its BatchNorm children replaced, or a new :class:`SyncBatchNorm` when
        ``module`` is itself a BatchNorm layer.
    """
    converted = module
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group, device="meta",
                                  bias=module.bias is not None)
        # the very objects, not copies: gradients, optimizers and requires_grad stay attached
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    return converted
