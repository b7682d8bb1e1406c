"""A rule defined outside kernels/, as a user would: forward Euler, Abar = 1 + z, w_0 = 1 (stable for z >= -2).

Shared by the kernel, reference and statistics tests: it must work everywhere with no kernel edit.
"""
import torch
import triton
import triton.language as tl  # noqa: F401  (Triton requires it among a jit function's globals)

from kernels.discretization import Discretizer


@triton.jit
def _euler_coeffs(z):
    zero = 0.0 * z
    return 1.0 + z, 1.0 + zero, zero, zero, zero


@triton.jit
def _euler_coeffs_grad(z):
    zero = 0.0 * z
    return 1.0 + z, 1.0 + zero, zero, zero, zero, 1.0 + zero, zero, zero, zero, zero


class ForwardEuler(Discretizer):
    """Test-only rule: Abar = 1 + z, w_0 = 1; can leave its stable range (z < -2)."""
    name = 'euler_test'
    history = 0
    z_stable = -2.0
    tl_coeffs = _euler_coeffs
    tl_coeffs_grad = _euler_coeffs_grad

    def abar(self, z):
        return 1.0 + z

    def input_weights(self, z):
        return (torch.ones_like(z), )
