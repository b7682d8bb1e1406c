"""Forward kernel of the fused residual add + RMSNorm over the channels of a (batch, C, L) stream.

A program owns (batch b, BLOCK_L tokens) and loads [BLOCK_C, BLOCK_L] tiles (BLOCK_C = next_pow2(C), masked):
memory is contiguous along L, so each channel row of the tile is one coalesced segment, and the norm's sum over
C is a reduction over axis 0 of the tile. It writes residual_out (fp32) and normed; rstd is not stored (the
backward recomputes it from residual_out, one more reduction over a tile it loads anyway).
"""
import triton
import triton.language as tl


@triton.jit
def channel_tile(pid_b, pid_l, C, L, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """(offsets of the program's [BLOCK_C, BLOCK_L] tile in a contiguous (batch, C, L) tensor, its mask,
    the channel offsets and their mask)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    c_ok = offs_c < C
    mask = c_ok[:, None] & (offs_l < L)[None, :]
    # int64 batch offset: batch * C * L passes 2**31 for large batches at 1024 px
    offs = pid_b.to(tl.int64) * C * L + offs_c[:, None] * L + offs_l[None, :]
    return offs, mask, offs_c, c_ok


@triton.jit
def add_rms_norm_fwd_kernel(
    hidden_ptr, residual_ptr, scale_ptr, weight_ptr,   # (batch, C, L) any float, (batch, C, L) fp32, (batch,), (C,)
    normed_ptr, res_out_ptr,                            # (batch, C, L) out dtype, (batch, C, L) fp32
    C, L, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs, mask, offs_c, c_ok = channel_tile(pid_b, pid_l, C, L, BLOCK_C, BLOCK_L)
    r = tl.load(hidden_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        if HAS_SCALE:
            r = r * tl.load(scale_ptr + pid_b).to(tl.float32)
        r += tl.load(residual_ptr + offs, mask=mask, other=0.0)
    tl.store(res_out_ptr + offs, r, mask=mask)
    # masked channels hold 0, so the sum is over the C real ones
    rstd = tl.rsqrt(tl.sum(r * r, axis=0) / C + eps)
    y = r * rstd[None, :] * w[:, None]
    tl.store(normed_ptr + offs, y.to(normed_ptr.dtype.element_ty), mask=mask)
