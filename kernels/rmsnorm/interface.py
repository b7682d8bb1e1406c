"""Launchers, autograd and the public fused residual add + RMSNorm for a channels-first (batch, C, L) stream.

Vim's residual stream stays (batch, C, L), contiguous along tokens, so that no transpose sits around the
mixer's GEMMs; the norm reduces over C, axis 1. Each block computes (mamba-ssm's prenorm, residual_in_fp32)
    residual_out = hidden (first block) or residual + scale[b] * hidden   (scale: DropPath's mask / keep_prob)
    normed = residual_out * rsqrt(mean_C(residual_out^2) + eps) * weight
with all math in fp32. Nothing here reads a tensor's values on the host, so both directions can be captured in
a CUDA graph.
"""
import os

import torch
import triton

from .backward import add_rms_norm_bwd_kernel
from .forward import add_rms_norm_fwd_kernel
from .naive import add_rms_norm_ref

# a program's tile is [next_pow2(C), BLOCK_L]: about TILE_ELEMENTS fp32 values, 32 a thread (64 spill in the
# backward), and at least MIN_BLOCK_L tokens so a channel row of the tile is a 64-byte (fp32) segment. H200,
# C = 192, L = 4096, batch 2-32 (CUDA-graph replays): the forward at 3.5-3.9 TB/s (a copy of as many bytes: 3.8-4),
# the backward at 2.1-2.4 (d weight's partials cost a third of it); tiles of 16 to 64 tokens and 4 to 16 warps,
# or a program looping over several tiles (fewer partials), were no faster
TILE_ELEMENTS = 8192
MIN_BLOCK_L = 16


def _launch(C, L):
    """(BLOCK_C, BLOCK_L, num_warps) of both kernels."""
    block_c = triton.next_power_of_2(C)
    block_l = min(triton.next_power_of_2(L), max(MIN_BLOCK_L, TILE_ELEMENTS // block_c))
    num_warps = min(16, max(1, block_c * block_l // 1024))
    return block_c, block_l, num_warps


def _add_rms_norm_fwd(hidden, residual, weight, eps, scale, out_dtype):
    batch, C, L = hidden.shape
    block_c, block_l, num_warps = _launch(C, L)
    normed = torch.empty(hidden.shape, device=hidden.device, dtype=out_dtype or hidden.dtype)
    res_out = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32)
    add_rms_norm_fwd_kernel[(triton.cdiv(L, block_l), batch)](
        hidden, residual if residual is not None else res_out, scale if scale is not None else weight, weight,
        normed, res_out, C, L, eps,
        HAS_RESIDUAL=residual is not None, HAS_SCALE=scale is not None, BLOCK_C=block_c, BLOCK_L=block_l,
        num_warps=num_warps)
    return normed, res_out


def _add_rms_norm_bwd(dnormed, dres_out, res_out, weight, scale, eps, hidden_dtype, need_dhidden, need_dresidual,
                      need_dweight):
    """(dhidden or None, dresidual or None, dweight or None); dnormed / dres_out None mean zeros."""
    batch, C, L = res_out.shape
    block_c, block_l, num_warps = _launch(C, L)
    n_l = triton.cdiv(L, block_l)
    dev = res_out.device
    dhidden = torch.empty(res_out.shape, device=dev, dtype=hidden_dtype) if need_dhidden else None
    dresidual = torch.empty(res_out.shape, device=dev, dtype=torch.float32) if need_dresidual else None
    store_dw = need_dweight and dnormed is not None
    dw_part = torch.empty(C, batch * n_l, device=dev, dtype=torch.float32) if store_dw else None
    if need_dhidden or need_dresidual or store_dw:
        add_rms_norm_bwd_kernel[(n_l, batch)](
            res_out, weight, scale if scale is not None else weight,
            dnormed if dnormed is not None else res_out, dres_out if dres_out is not None else res_out,
            dhidden if need_dhidden else res_out, dresidual if need_dresidual else res_out,
            dw_part if store_dw else res_out, C, L, eps,
            HAS_DNORMED=dnormed is not None, HAS_DRES_OUT=dres_out is not None, HAS_SCALE=scale is not None,
            STORE_DHIDDEN=need_dhidden, STORE_DRESIDUAL=need_dresidual, STORE_DWEIGHT=store_dw,
            BLOCK_C=block_c, BLOCK_L=block_l, num_warps=num_warps)
    # the deterministic sum of the per-program partials; none without dnormed (weight's gradient is then None,
    # as torch's autograd leaves it)
    dweight = dw_part.sum(1).to(weight.dtype) if store_dw else None
    return dhidden, dresidual, dweight


def _contiguous(x):
    return x.contiguous() if x is not None else None


class AddRMSNormFn(torch.autograd.Function):
    """Saves residual_out, weight and scale (not normed); the backward recomputes rstd."""

    @staticmethod
    def forward(ctx, hidden, residual, weight, eps, scale, out_dtype):
        # scale is a constant: only used (and saved) where a residual is added
        scale = scale if residual is not None else None
        normed, res_out = _add_rms_norm_fwd(hidden, residual, weight, eps, scale, out_dtype)
        ctx.save_for_backward(res_out, weight, scale)
        ctx.eps, ctx.hidden_dtype, ctx.has_residual = eps, hidden.dtype, residual is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a zero tensor
        return normed, res_out

    @staticmethod
    def backward(ctx, dnormed, dres_out):
        res_out, weight, scale = ctx.saved_tensors
        need_h, need_r, need_w = ctx.needs_input_grad[:3]
        if dnormed is None and dres_out is None:
            return None, None, None, None, None, None
        dhidden, dresidual, dweight = _add_rms_norm_bwd(
            _contiguous(dnormed), _contiguous(dres_out), res_out, weight, scale, ctx.eps, ctx.hidden_dtype,
            need_h, need_r and ctx.has_residual, need_w)
        return dhidden, dresidual, dweight, None, None, None


# ----------------------------------------------------------------------------------------------------
# Checks and the public functions
# ----------------------------------------------------------------------------------------------------
def check_inputs(hidden, residual, weight, scale=None, out_dtype=None):
    """Raise a ValueError naming the argument for anything add_rms_norm does not accept."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or min(hidden.shape) < 1 \
            or not hidden.is_floating_point():
        raise ValueError('hidden must be a floating-point (batch, C, L) tensor with every size >= 1, got '
                         f'{getattr(hidden, "dtype", type(hidden))} of shape {tuple(getattr(hidden, "shape", ()))}')
    batch, C, L = hidden.shape
    if residual is not None:
        if residual.shape != hidden.shape:
            raise ValueError(f"residual must have hidden's shape {tuple(hidden.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != torch.float32:
            raise ValueError(f'residual must be fp32 (the residual stream is kept in fp32), got {residual.dtype}')
    if weight.shape != (C,) or not weight.is_floating_point():
        raise ValueError(f'weight must be a floating-point (C={C},) tensor, got {weight.dtype} of shape '
                         f'{tuple(weight.shape)}')
    if scale is not None and (scale.shape != (batch,) or not scale.is_floating_point()):
        raise ValueError(f'scale must be None or a floating-point (batch={batch},) tensor, got {scale.dtype} of '
                         f'shape {tuple(scale.shape)}')
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f'out_dtype must be None or a floating-point torch.dtype, got {out_dtype!r}')
    for name, x in (('residual', residual), ('weight', weight), ('scale', scale)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f'{name} must be on {hidden.device} with hidden, got {x.device}')


def add_rms_norm_triton(hidden, residual, weight, eps=1e-5, scale=None, out_dtype=None):
    """The fused Triton kernels whatever the device (CPU needs TRITON_INTERPRET=1)."""
    check_inputs(hidden, residual, weight, scale, out_dtype)
    return _apply(hidden, residual, weight, eps, scale, out_dtype)


def _apply(hidden, residual, weight, eps, scale, out_dtype):
    return AddRMSNormFn.apply(hidden.contiguous(), _contiguous(residual), weight.contiguous(), float(eps),
                              _contiguous(scale), out_dtype)


def add_rms_norm(hidden, residual, weight, eps=1e-5, scale=None, out_dtype=None):
    """Fused residual add + RMSNorm over the channels of a channels-first (batch, C, L) residual stream.

    residual_out = hidden if residual is None, else residual + scale[b] * hidden (scale: an optional (batch,)
    per-sample factor, DropPath's mask / keep_prob, treated as a constant; ignored when residual is None);
    normed = residual_out * rsqrt(mean_over_C(residual_out^2) + eps) * weight[c]; all math in fp32.

    hidden: (batch, C, L), any float dtype (bf16 under autocast, or fp32); residual: (batch, C, L) fp32 or None;
    weight: (C,) (fp32); scale: (batch,) float or None. Returns (normed, residual_out): normed (batch, C, L)
    contiguous in out_dtype (default hidden.dtype), residual_out (batch, C, L) fp32 contiguous. Gradients flow to
    hidden, residual and weight from both outputs; dweight is summed deterministically in fp32.

    CUDA tensors run the fused Triton kernels; others run `add_rms_norm_ref` (plain torch). VIM_DISC_NORM=triton
    forces the kernels (on CPU under TRITON_INTERPRET=1), =ref the reference.

    Example::
        normed, residual = add_rms_norm(hidden, residual, self.norm.weight, eps=1e-5, scale=keep / keep_prob,
                                        out_dtype=torch.bfloat16)
    """
    mode = os.environ.get('VIM_DISC_NORM', '')
    if mode not in ('', 'ref', 'triton'):
        raise ValueError(f"VIM_DISC_NORM={mode!r}: expected 'triton' or 'ref'")
    check_inputs(hidden, residual, weight, scale, out_dtype)
    if mode == 'triton' or (mode == '' and hidden.is_cuda):
        return _apply(hidden, residual, weight, eps, scale, out_dtype)
    return add_rms_norm_ref(hidden, residual, weight, eps, scale, out_dtype)
