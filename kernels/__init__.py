"""Selective-scan kernels with pluggable discretization (pure torch + triton; no mmengine/mmdet).

``selective_scan_fn``: the public op (fused Triton on CUDA, a parallel PyTorch scan on CPU);
``selective_scan_ref``: the sequential float64-exact oracle; ``Discretizer`` and the six rules.
"""
from .discretization import (MAX_HISTORY, RULES, FOH, RK4, ZOH, Bilinear, Discretizer, HighOrder, Poly,
                             get_discretizer, phi)
from .naive import selective_scan_ref
from .parallel import selective_scan_parallel
from .scan import ScanConfig, selective_scan_fn, selective_scan_triton

__all__ = [
    'Discretizer', 'ZOH', 'FOH', 'Bilinear', 'Poly', 'HighOrder', 'RK4', 'RULES', 'MAX_HISTORY', 'get_discretizer',
    'phi', 'selective_scan_fn', 'selective_scan_ref', 'selective_scan_parallel',
    'selective_scan_triton', 'ScanConfig'
]
