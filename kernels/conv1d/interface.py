"""Launchers, autograd and the public function of the bidirectional depthwise conv1d + SiLU.

Shapes: x (batch, dim, L) with any batch/channel strides (a channel slice of in_proj's output); weight (R, dim, K)
with R = 1 (causal only) or 2 (causal, anti-causal); bias (R, dim) or None -> out (batch, R, dim, L) contiguous,
which the caller views as (batch, R * dim, L). Anything else is a ValueError naming the argument.
"""
import os
from dataclasses import dataclass

import torch
import triton

from .backward import conv1d_silu_bwd_kernel
from .forward import conv1d_silu_fwd_kernel
from .naive import depthwise_conv1d_silu_ref

MAX_K = 8  # taps the kernels unroll (2K-1 shifted x blocks live in registers in the backward)


@dataclass(frozen=True)
class ConvConfig:
    """Launch shape; 0 picks from the problem's shape. block_d / block_l: channels / time steps of a program's
    tile (powers of two); num_warps: warps per program; l_programs: program columns along time in the backward
    (each walks its run of tiles and owns one dweight/dbias partial row)."""
    block_d: int = 0
    block_l: int = 0
    num_warps: int = 0
    block_d_bwd: int = 0
    block_l_bwd: int = 0
    num_warps_bwd: int = 0
    l_programs: int = 0


def _pow2(name, v):
    if v and v & (v - 1):
        raise ValueError(f'{name} must be a power of two, got {v}')
    return v


def _tile(block_d, block_l, num_warps, dim, L, max_l, elems):
    """(BLOCK_D, BLOCK_L, num_warps): a tile of about `elems` values, long in time (contiguous loads), a warp
    per 128 values."""
    block_l = _pow2('block_l', block_l) or min(max_l, triton.next_power_of_2(L))
    block_d = _pow2('block_d', block_d) or min(triton.next_power_of_2(dim), max(1, elems // block_l))
    num_warps = num_warps or max(1, min(8, block_d * block_l // 128))
    return block_d, block_l, num_warps


def fwd_launch(dim, L, cfg):
    """(BLOCK_D, BLOCK_L, num_warps) of the forward kernel: [2, 256] tiles, 4 warps (an H200 sweep at batch 2/8,
    dim 384, L 4096, bf16: 11 / 40 us, about a copy of x's bytes; larger or smaller tiles within 5%)."""
    return _tile(cfg.block_d, cfg.block_l, cfg.num_warps, dim, L, 256, 512)


def bwd_launch(dim, L, cfg):
    """(BLOCK_D, BLOCK_L, num_warps) of the backward kernel: [1, 128] tiles, one warp (2K-1 x blocks and
    2R(K+1) accumulators live at once; the same sweep: 35 / 126 us, the best of 24 launch shapes)."""
    return _tile(cfg.block_d_bwd, cfg.block_l_bwd, cfg.num_warps_bwd, dim, L, 128, 128)


def _sm_count(device):
    if device.type != 'cuda':
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _last_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _conv_fwd(x, weight, bias, silu, cfg):
    batch, dim, L = x.shape
    R, _, K = weight.shape
    block_d, block_l, num_warps = fwd_launch(dim, L, cfg)
    out = torch.empty(batch, R, dim, L, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(L, block_l), triton.cdiv(dim, block_d), batch)
    conv1d_silu_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, out, dim, L, x.stride(0), x.stride(1),
        K=K, R=R, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l, num_warps=num_warps)
    return out


def _conv_bwd(dout, x, weight, bias, silu, cfg):
    batch, dim, L = x.shape
    R, _, K = weight.shape
    block_d, block_l, num_warps = bwd_launch(dim, L, cfg)
    n_tiles, n_dblocks = triton.cdiv(L, block_l), triton.cdiv(dim, block_d)
    # about 16 warps per SM (H200: within 3% of the best column count at batch 2 and 8); each program walks
    # the rest of its time axis
    l_programs = cfg.l_programs or max(1, triton.cdiv(16 * _sm_count(x.device) // num_warps, batch * n_dblocks))
    tiles_per_prog = triton.cdiv(n_tiles, min(l_programs, n_tiles))
    l_programs = triton.cdiv(n_tiles, tiles_per_prog)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    part = torch.empty(batch * l_programs, R, dim, K + 1, device=x.device, dtype=torch.float32)
    conv1d_silu_bwd_kernel[(l_programs, n_dblocks, batch)](
        x, weight, bias if bias is not None else weight, dout, dx, part, dim, L, tiles_per_prog,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dout.stride(2), dx.stride(0), dx.stride(1),
        K=K, R=R, HAS_BIAS=bias is not None, SILU=silu, BLOCK_D=block_d, BLOCK_L=block_l,
        KB=triton.next_power_of_2(K + 1), num_warps=num_warps)
    sums = part.sum(0)  # (R, dim, K + 1): fixed order, deterministic
    return dx, sums[..., :K], sums[..., K]


class DepthwiseConv1dSiluFn(torch.autograd.Function):
    """Saves x and the parameters; the backward recomputes the pre-activations."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu, cfg):
        x = _last_contiguous(x)
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else None
        out = _conv_fwd(x, w, b, silu, cfg)
        ctx.save_for_backward(x, w, b)
        ctx.meta = (silu, cfg, weight.dtype, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, b = ctx.saved_tensors
        silu, cfg, w_dtype, b_dtype = ctx.meta
        dx, dw, db = _conv_bwd(_last_contiguous(dout), x, w, b, silu, cfg)
        return dx, dw.to(w_dtype), db.to(b_dtype) if b is not None else None, None, None


def check_inputs(x, weight, bias=None, activation='silu'):
    """Raise a ValueError naming the argument for anything but x (batch, dim, L), weight (R in {1, 2}, dim, K),
    bias (R, dim) or None, activation 'silu' or None."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] < 1:
        raise ValueError(f'x must be a (batch, dim, L) tensor with L >= 1, got {tuple(getattr(x, "shape", ()))}')
    dim = x.shape[1]
    if weight.dim() != 3 or weight.shape[0] not in (1, 2) or weight.shape[1] != dim or weight.shape[2] < 1:
        raise ValueError(f'weight must be (R, dim={dim}, K) with R in {{1, 2}} directions, '
                         f'got {tuple(weight.shape)}')
    if bias is not None and tuple(bias.shape) != tuple(weight.shape[:2]):
        raise ValueError(f'bias must be (R, dim) = {tuple(weight.shape[:2])} or None, got {tuple(bias.shape)}')
    if activation not in ('silu', None):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    for name, t in (('x', x), ('weight', weight), ('bias', bias)):
        if t is not None and (not t.is_floating_point() or t.device != x.device):
            raise ValueError(f'{name} must be a floating-point tensor on {x.device}, got {t.dtype} on {t.device}')


def depthwise_conv1d_silu_triton(x, weight, bias=None, activation='silu', *, config=None):
    """The fused Triton kernels whatever the device (CPU needs TRITON_INTERPRET=1); `config`: a ConvConfig."""
    check_inputs(x, weight, bias, activation)
    if x.dtype == torch.float64:
        raise ValueError('x: the Triton conv computes in fp32; pass fp32/fp16/bf16 (float64 runs the reference)')
    if weight.shape[2] > MAX_K:
        raise ValueError(f'weight: the Triton conv unrolls at most K={MAX_K} taps, got K={weight.shape[2]}')
    return DepthwiseConv1dSiluFn.apply(x, weight, bias, activation == 'silu', config or ConvConfig())


def depthwise_conv1d_silu(x, weight, bias=None, activation='silu'):
    """Vim's per-direction depthwise conv1d + SiLU, both scan directions in one launch (forward and backward).

        out[:, 0, d, t] = silu(bias[0, d] + sum_k weight[0, d, k] x[:, d, t - K + 1 + k])          causal
        out[:, 1, d, t] = silu(bias[1, d] + sum_k weight[1, d, K - 1 - k] x[:, d, t + k])      anti-causal
    (x = 0 outside [0, L)); direction 1 is the causal conv of x.flip(-1) with weight[1], flipped back.

    x: (batch, dim, L) fp32/fp16/bf16, any batch/channel strides (e.g. ``xz[:, :dim]``); weight: (R, dim, K),
    R = 1 (direction 0 only) or 2; bias: (R, dim) or None; activation: 'silu' or None. Returns
    out (batch, R, dim, L), contiguous, in x's dtype; all math is fp32 (so x may be bf16 with fp32 weights
    under autocast). Gradients: dx in x's dtype (both directions, written once), dweight/dbias in their
    dtypes, summed in fp32 in a fixed order (deterministic). The backward recomputes the pre-activations.

    CUDA tensors (fp32/fp16/bf16, K <= 8) run the Triton kernels; anything else `depthwise_conv1d_silu_ref`.
    VIM_DISC_CONV=triton forces the Triton kernels (on CPU under TRITON_INTERPRET=1), =ref the reference.

    Example::
        xz = in_proj(h)                                   # (batch, 2 * dim, L)
        w = torch.stack([conv1d.weight[:, 0], conv1d_b.weight[:, 0]])        # (2, dim, K)
        b = torch.stack([conv1d.bias, conv1d_b.bias])                        # (2, dim)
        x = depthwise_conv1d_silu(xz[:, :dim], w, b).view(batch, 2 * dim, L)
    """
    mode = os.environ.get('VIM_DISC_CONV', '')
    if mode not in ('', 'triton', 'ref'):
        raise ValueError(f"VIM_DISC_CONV={mode!r}: expected 'triton' or 'ref'")
    if mode == 'triton' or (mode == '' and x.is_cuda and x.dtype != torch.float64 and weight.dim() == 3
                            and weight.shape[-1] <= MAX_K):
        return depthwise_conv1d_silu_triton(x, weight, bias, activation)
    return depthwise_conv1d_silu_ref(x, weight, bias, activation)
