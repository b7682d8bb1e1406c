"""Fused residual add + RMSNorm for a channels-first (batch, C, L) stream (fla's ops/<op>/ layout): forward.py
and backward.py (one kernel each), interface.py (launchers, autograd, checks and the public functions),
naive.py (the plain torch reference).
"""
from .interface import add_rms_norm, add_rms_norm_triton, check_inputs
from .naive import add_rms_norm_ref

__all__ = ['add_rms_norm', 'add_rms_norm_triton', 'add_rms_norm_ref', 'check_inputs']
