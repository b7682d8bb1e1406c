"""The reference: residual add + RMSNorm over channels in plain torch (all math in fp32), autograd for gradients.

mamba-ssm's prenorm with residual_in_fp32 (``layer_norm_fn(..., prenorm=True, residual_in_fp32=True)`` with
RMSNorm), on a channels-first (batch, C, L) stream, with Vim's DropPath folded in as a per-sample factor.
"""
import torch


def add_rms_norm_ref(hidden, residual, weight, eps=1e-5, scale=None, out_dtype=None):
    """residual_out = hidden (residual None) or residual + scale[b] * hidden;
    normed = residual_out * rsqrt(mean_C(residual_out^2) + eps) * weight[c].

    hidden (batch, C, L) any float dtype; residual (batch, C, L) fp32 or None; weight (C,); scale (batch,) or
    None (1; ignored when residual is None, as Vim's first block adds no residual). Returns (normed in out_dtype
    (default hidden.dtype), residual_out fp32), both (batch, C, L).
    """
    if residual is None:
        r = hidden.to(torch.float32, copy=True)  # a new tensor even for fp32 hidden, as the kernel's
    elif scale is None:
        r = residual + hidden.float()
    else:
        r = residual + scale.float()[:, None, None] * hidden.float()
    normed = r * torch.rsqrt(r.pow(2).mean(1, keepdim=True) + eps) * weight.float()[:, None]
    return normed.to(out_dtype or hidden.dtype), r
