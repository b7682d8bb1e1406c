"""Backward kernel of the bidirectional depthwise conv1d + SiLU: both directions, dx, dweight, dbias, one launch.

With g_r = dout_r * silu'(pre_r) (the pre-activations recomputed from x, never saved), the forward's taps
transposed:
    dx[t] = sum_j w0[K - 1 - j] g0[t + j] + sum_j w1[K - 1 - j] g1[t - j]
    dw0[k] = sum_{b,t} g0[t] x[t - K + 1 + k],   dw1[K - 1 - k] = sum_{b,t} g1[t] x[t + k],   db_r = sum_{b,t} g_r[t]
A program owns (batch b, BLOCK_D channels) and walks a run of `tiles_per_prog` tiles of BLOCK_L steps. Per tile it
loads the 2K-1 shifted blocks of x once (a tuple in registers), rebuilds pre0 at t + j and pre1 at t - j (j < K)
from them with register FMAs, loads dout at those shifts (0 outside [0, L), so steps past the ends add nothing)
and adds each g's share to dx, which is written once (no atomics). Register tensors cannot be shifted along time,
so g at the K shifts is recomputed rather than moved (moving it with tl.gather through shared memory measured no
faster on the H200). dweight/dbias products accumulate elementwise in registers across the program's tiles and
are reduced once at its end into a partial row this program alone owns; the caller sums the partials in torch
(deterministic, as the Triton layer-norm tutorial).
"""
import triton
import triton.language as tl

from .forward import bias_column, load_shifted, tap


@triton.jit
def _grad_pre(pre, dout, SILU: tl.constexpr):
    """dL/dpre = dout * silu'(pre), silu'(p) = s (1 + p (1 - s)) with s = sigmoid(p)."""
    if SILU:
        s = tl.sigmoid(pre)
        return dout * (s * (1.0 + pre * (1.0 - s)))
    else:
        return dout


@triton.jit
def conv1d_silu_bwd_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr,
    part_ptr,                   # (batch * n_lprog, R, dim, K + 1) fp32: this program's dweight | dbias row
    dim, L, tiles_per_prog, s_xb, s_xd, s_gb, s_gr, s_gd, s_dxb, s_dxd,
    K: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr, KB: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    x_row = x_ptr + pid_b * s_xb + offs_d[:, None] * s_xd
    g0_row = dout_ptr + pid_b * s_gb + offs_d[:, None] * s_gd
    g1_row = g0_row + (R - 1) * s_gr
    dx_row = dx_ptr + pid_b * s_dxb + offs_d[:, None] * s_dxd
    bias0 = bias_column(b_ptr, offs_d, d_ok, dim, 0, HAS_BIAS)
    bias1 = bias_column(b_ptr, offs_d, d_ok, dim, R - 1, HAS_BIAS)

    # acc[r * (K + 1) + k]: per-step products of dweight[r, :, k]; acc[r * (K + 1) + K]: of dbias[r]
    zero = tl.zeros([BLOCK_D, BLOCK_L], dtype=tl.float32)
    acc = ()
    for k in tl.static_range(R * (K + 1)):
        acc = acc + (zero,)
    i = 0
    while i < tiles_per_prog:  # while, not range(): the interpreter cannot take a runtime bound
        t = (pid_l * tiles_per_prog + i) * BLOCK_L + tl.arange(0, BLOCK_L)
        # xs[S + K - 1] = x[t + S], S in -(K-1)..K-1 (g0[t + j] alone reaches up to x[t + K - 1])
        xs = ()
        for s in tl.static_range(2 * K - 1):
            xs = xs + (load_shifted(x_row, t, s - (K - 1), L, d_ok),)
        dx = zero
        new = ()
        # direction 0: g0[t + j] reaches dx[t] through tap K - 1 - j
        for j in tl.static_range(K):
            pre = bias0 + zero
            if SILU:
                for k in tl.static_range(K):  # pre0[t + j] = b0 + sum_k w0[k] x[t + j - K + 1 + k]
                    pre += tap(w_ptr, offs_d, d_ok, dim, 0, k, K) * xs[j + k]
            g = _grad_pre(pre, load_shifted(g0_row, t, j, L, d_ok), SILU)
            dx += tap(w_ptr, offs_d, d_ok, dim, 0, K - 1 - j, K) * g
            if j == 0:  # dw0[k] += g0[t] x[t - K + 1 + k], db0 += g0[t]
                for k in tl.static_range(K):
                    new = new + (acc[k] + g * xs[k],)
                new = new + (acc[K] + g,)
        # direction 1: g1[t - j] reaches dx[t] through tap K - 1 - j
        if R == 2:
            for j in tl.static_range(K):
                pre = bias1 + zero
                if SILU:
                    for k in tl.static_range(K):  # pre1[t - j] = b1 + sum_k w1[K - 1 - k] x[t - j + k]
                        pre += tap(w_ptr, offs_d, d_ok, dim, 1, K - 1 - k, K) * xs[K - 1 - j + k]
                g = _grad_pre(pre, load_shifted(g1_row, t, -j, L, d_ok), SILU)
                dx += tap(w_ptr, offs_d, d_ok, dim, 1, K - 1 - j, K) * g
                if j == 0:  # dw1[k] += g1[t] x[t + K - 1 - k], db1 += g1[t]
                    for k in tl.static_range(K):
                        new = new + (acc[K + 1 + k] + g * xs[2 * K - 2 - k],)
                    new = new + (acc[2 * K + 1] + g,)
        acc = new
        tl.store(dx_row + t[None, :], dx.to(dx_ptr.dtype.element_ty), mask=d_ok[:, None] & (t < L)[None, :])
        i += 1

    cols = tl.arange(0, KB)
    part_mask = d_ok[:, None] & (cols <= K)[None, :]
    part_row = part_ptr + ((pid_b * tl.num_programs(0) + pid_l) * R * dim + offs_d[:, None]) * (K + 1) + cols[None, :]
    for r in tl.static_range(R):
        sums = tl.zeros([BLOCK_D, KB], dtype=tl.float32)
        for k in tl.static_range(K + 1):
            sums += tl.where(cols[None, :] == k, tl.sum(acc[r * (K + 1) + k], axis=1)[:, None], 0.0)
        tl.store(part_row + r * dim * (K + 1), sums, mask=part_mask)
