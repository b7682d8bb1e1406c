"""The fused bidirectional depthwise conv1d + SiLU of Vim's mixer (fla's ops/<op>/ layout): forward.py and
backward.py (one kernel each), interface.py (launchers, autograd, checks and the public functions), naive.py (the
torch reference).
"""
from .interface import ConvConfig, check_inputs, depthwise_conv1d_silu, depthwise_conv1d_silu_triton
from .naive import depthwise_conv1d_silu_ref

__all__ = ['ConvConfig', 'check_inputs', 'depthwise_conv1d_silu', 'depthwise_conv1d_silu_triton',
           'depthwise_conv1d_silu_ref']
