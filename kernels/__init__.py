"""Selective-scan kernels with pluggable discretization (pure torch + triton; no mmengine/mmdet).

``selective_scan_fn``: the public op (fused Triton on CUDA, a parallel PyTorch scan on CPU), and
``bidirectional_selective_scan`` (Vim's two directions in one launch); ``selective_scan_ref``: the sequential
float64-exact oracle; ``Discretizer`` and the six rules. The other fused ops of the Vim block:
``depthwise_conv1d_silu`` (both directions' conv + SiLU) and ``add_rms_norm`` (residual add + RMSNorm).
"""
from .conv1d import depthwise_conv1d_silu, depthwise_conv1d_silu_ref
from .discretization import (MAX_HISTORY, RULES, FOH, RK4, ZOH, Bilinear, Discretizer, HighOrder, Poly,
                             get_discretizer, phi)
from .naive import selective_scan_ref
from .parallel import selective_scan_parallel
from .rmsnorm import add_rms_norm, add_rms_norm_ref
from .scan import ScanConfig, bidirectional_selective_scan, selective_scan_fn, selective_scan_triton

__all__ = [
    'Discretizer', 'ZOH', 'FOH', 'Bilinear', 'Poly', 'HighOrder', 'RK4', 'RULES', 'MAX_HISTORY', 'get_discretizer',
    'phi', 'selective_scan_fn', 'selective_scan_ref', 'selective_scan_parallel',
    'selective_scan_triton', 'ScanConfig', 'bidirectional_selective_scan', 'depthwise_conv1d_silu',
    'depthwise_conv1d_silu_ref', 'add_rms_norm', 'add_rms_norm_ref'
]

# the conv's always-Triton entry point (depthwise_conv1d_silu and its reference are exported above)
from .conv1d import depthwise_conv1d_silu_triton  # noqa: E402
__all__ += ['depthwise_conv1d_silu_triton']
