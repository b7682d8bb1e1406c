"""Backward kernel of the fused residual add + RMSNorm (standard RMSNorm gradient, per token over C).

With r = residual_out, rstd = rsqrt(mean_C(r^2) + eps), xhat = r * rstd and g = dnormed * weight:
    dr = d residual_out + rstd * (g - xhat * mean_C(g * xhat))
    dhidden = scale[b] * dr (hidden's dtype),  dresidual = dr (fp32),  dweight = sum_{batch, L} dnormed * xhat.
A program owns the forward's (batch b, BLOCK_L tokens) tile and recomputes rstd from residual_out. dweight is
deterministic: each program writes its own fp32 partial (its tile's sum over L), and the caller sums the
partials with torch (the Triton layer-norm tutorial's pattern, without locks). The partials are stored as the
columns of a (C, programs) buffer: torch sums along a contiguous axis about twice as fast (H200, 1024 partials).
"""
import triton
import triton.language as tl

from .forward import channel_tile


@triton.jit
def add_rms_norm_bwd_kernel(
    res_out_ptr, weight_ptr, scale_ptr,       # (batch, C, L) fp32, (C,), (batch,)
    dnormed_ptr, dres_out_ptr,                # (batch, C, L) upstream gradients (either may be absent)
    dhidden_ptr, dresidual_ptr,               # (batch, C, L) hidden's dtype, fp32
    dweight_part_ptr,                         # (C, batch * n_programs_l) fp32: one partial column per program
    C, L, eps,
    HAS_DNORMED: tl.constexpr, HAS_DRES_OUT: tl.constexpr, HAS_SCALE: tl.constexpr,
    STORE_DHIDDEN: tl.constexpr, STORE_DRESIDUAL: tl.constexpr, STORE_DWEIGHT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs, mask, offs_c, c_ok = channel_tile(pid_b, pid_l, C, L, BLOCK_C, BLOCK_L)
    # every load is issued before the first reduction, so their latencies overlap
    if HAS_DNORMED:
        r = tl.load(res_out_ptr + offs, mask=mask, other=0.0)
        dn = tl.load(dnormed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_DRES_OUT:
        dr = tl.load(dres_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dr = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
    if HAS_DNORMED:
        rstd = tl.rsqrt(tl.sum(r * r, axis=0) / C + eps)
        xhat = r * rstd[None, :]
        g = dn * w[:, None]
        # masked channels and tokens have g = xhat = 0: they add nothing to either sum
        mean_gx = tl.sum(g * xhat, axis=0) / C
        dr += rstd[None, :] * (g - xhat * mean_gx[None, :])
        if STORE_DWEIGHT:
            n_parts = tl.num_programs(0) * tl.num_programs(1)
            part = pid_b * tl.num_programs(0) + pid_l
            tl.store(dweight_part_ptr + offs_c * n_parts + part, tl.sum(dn * xhat, axis=1), mask=c_ok)
    if STORE_DRESIDUAL:
        tl.store(dresidual_ptr + offs, dr, mask=mask)
    if STORE_DHIDDEN:
        if HAS_SCALE:
            dr = dr * tl.load(scale_ptr + pid_b).to(tl.float32)
        tl.store(dhidden_ptr + offs, dr.to(dhidden_ptr.dtype.element_ty), mask=mask)
