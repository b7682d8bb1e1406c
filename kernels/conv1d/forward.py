"""Forward kernel of the bidirectional depthwise conv1d + SiLU: both directions in one launch.

A program owns (batch b, BLOCK_D channels, BLOCK_L steps of time). Direction 0 (causal) reads x at the shifts
-(K-1)..0, direction 1 (anti-causal) at 0..K-1: the program loads each of the 2K-1 shifted [BLOCK_D, BLOCK_L]
blocks of x once (the overlapping loads hit L1/L2) and feeds it to both directions' fp32 accumulators, then
writes out[b, r] = silu(acc_r). Register tensors cannot be shifted along time in Triton, hence the shifted loads.
"""
import triton
import triton.language as tl


@triton.jit
def load_shifted(row, t, S: tl.constexpr, L, d_ok):
    """x[:, t + S] as a fp32 [BLOCK_D, BLOCK_L] block (row: [BLOCK_D, 1] channel pointers), 0 outside [0, L):
    the convolution's zero padding."""
    ts = t + S
    return tl.load(row + ts[None, :], mask=d_ok[:, None] & ((ts >= 0) & (ts < L))[None, :], other=0.0).to(tl.float32)


@triton.jit
def tap(w_ptr, offs_d, d_ok, dim, R_IDX: tl.constexpr, J: tl.constexpr, K: tl.constexpr):
    """weight[R_IDX, :, J] as a fp32 [BLOCK_D, 1] column (weight contiguous (R, dim, K))."""
    return tl.load(w_ptr + (R_IDX * dim + offs_d) * K + J, mask=d_ok, other=0.0).to(tl.float32)[:, None]


@triton.jit
def bias_column(b_ptr, offs_d, d_ok, dim, R_IDX: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(b_ptr + R_IDX * dim + offs_d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    else:
        return tl.zeros_like(offs_d.to(tl.float32))[:, None]


@triton.jit
def conv1d_silu_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,   # x (batch, dim, L) last stride 1; w (R, dim, K), b (R, dim); out (batch, R, dim, L)
    dim, L, s_xb, s_xd,
    K: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    x_row = x_ptr + pid_b * s_xb + offs_d[:, None] * s_xd

    acc0 = bias_column(b_ptr, offs_d, d_ok, dim, 0, HAS_BIAS) + tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    acc1 = bias_column(b_ptr, offs_d, d_ok, dim, R - 1, HAS_BIAS) + tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    for i in tl.static_range(2 * K - 1):
        S = i - (K - 1)  # x[t + S], a compile-time shift
        if S <= 0 or R == 2:  # one direction reads only the causal half
            xs = load_shifted(x_row, t, S, L, d_ok)
            if S <= 0:  # y0[t] = sum_k w0[k] x[t - K + 1 + k]: tap k = S + K - 1
                acc0 += tap(w_ptr, offs_d, d_ok, dim, 0, S + K - 1, K) * xs
            if R == 2 and S >= 0:  # y1[t] = sum_k w1[K - 1 - k] x[t + k]: tap K - 1 - S
                acc1 += tap(w_ptr, offs_d, d_ok, dim, 1, K - 1 - S, K) * xs
    if SILU:
        acc0 = acc0 * tl.sigmoid(acc0)
        acc1 = acc1 * tl.sigmoid(acc1)
    mask = d_ok[:, None] & (t < L)[None, :]
    out_row = out_ptr + (pid_b * R * dim + offs_d[:, None]) * L + t[None, :]
    tl.store(out_row, acc0.to(out_ptr.dtype.element_ty), mask=mask)
    if R == 2:
        tl.store(out_row + dim * L, acc1.to(out_ptr.dtype.element_ty), mask=mask)
