"""Kernels shared by the backbones and the necks: training-time attention, the fused CPU inference
block and its compiled form. Which of them a call uses is decided in :mod:`reid_ms.dispatch`."""
