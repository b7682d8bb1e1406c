"""The fused selective scan (fla's ops/<op>/ layout): common.py (shared Triton helpers), forward.py and
backward.py (one kernel each), interface.py (launchers, autograd, checks and the public functions).
"""
from .interface import (ScanConfig, bidirectional_selective_scan, check_inputs, selective_scan_fn,
                        selective_scan_triton)

__all__ = ['ScanConfig', 'bidirectional_selective_scan', 'check_inputs', 'selective_scan_fn', 'selective_scan_triton']
