"""The fused Triton selective scan, forward and backward, for any discretization rule.

For channel d, state n, with a = A[d, n] < 0, z_t = delta_t a (after the rule's clamp), v_t = B_t[n] u_t:

    h_t = Abar(z_t) h_{t-1} + delta_t sum_{j=0..K} w_j(z_t) v_{t-j}     (v before t = 0 is 0, h_{-1} = 0)
    y_t = sum_n C_t[n] h_t[n] + D u_t                                    [* silu(gate_t)]

The rule enters only through its ``tl_coeffs`` / ``tl_coeffs_grad`` jit functions (passed as
``tl.constexpr``) and ``HISTORY`` = K, so a new rule needs no kernel edit.

Work layout (mamba-ssm's, in Triton). A program owns BLOCK_D channels and walks time in tiles of TILE_L
steps; inside a tile it loops over the N states. A tile is a [BLOCK_D, TILE_L] block whose rows are
loaded as one 16-byte vector per thread, so each thread holds one channel's run of consecutive steps and
``tl.associative_scan`` along time runs sequentially inside the thread (no shuffles; a reverse-time
scan is a forward scan of ``tl.flip``-ped runs, because ``reverse=True`` shuffles across lanes). The sum
over states (y, du, d delta) is a register accumulation; the per-(channel, state) carry between tiles
lives in a small fp32 buffer laid out (..., N, dim), so one state's channels are one coalesced access.
A trip of the state loop handles STATES states and issues all their loads before any store: the
compiler cannot prove the carry store of one state and the carry load of the next apart.

Chunks. To fill the GPU when batch x channel blocks is small (detection: batch 2, L = 4096), L is cut
into chunks that run in parallel: a summary pass gives each chunk's (prod Abar, local end state), a
small sequential pass over chunks turns those into every chunk's true start state, and the main pass
reruns the chunk from it (a two-level scan). The backward mirrors it in reverse time.

Memory. Forward saves only the inputs and h at the start of every segment of SEG tiles,
(batch, L / (SEG TILE_L), N, dim) fp32; the (batch, dim, L, N) state tensor is never written. The
backward recomputes, per segment, the states at its tile starts into a per-program scratch.

Backward, per tile in reverse time order and per state: a forward scan over (Abar_t, 1, x_t, 0)
4-tuples returns h_t AND h_{t-1} side by side (never inverting h_t = Abar h_{t-1} + x, unstable when
Abar -> 0); a reverse scan over g_t = Abar_t dh_t (g_t = Abar_t g_{t+1} + Abar_t c_t, c_t = C_t dy_t)
returns g_{t+1} beside g_t, so dh_t = g_{t+1} + c_t needs no shifted reload either. A history term
w_j v_{t-j} sends its input gradient j steps back: the tile's contributions are shifted with
``tl.gather``; what falls into the previous tile is carried (du) or added there (dB), what falls into
the previous chunk goes to a small halo buffer added afterwards. dB/dC (sums over channels) go into
per-split partial buffers summed in torch: deterministic, no atomics.
"""
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .discretization import MAX_HISTORY, get_discretizer


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _affine_lag_combine(p1, q1, r1, s1, p2, q2, r2, s2):
    # An element maps the carried state h to (new state, the state one step earlier) = (p h + r, q h + s);
    # one step is (Abar, 1, x, 0). Composition keeps both, so a scan returns h_t and h_{t-1} together.
    return p1 * p2, q2 * p1, p2 * r1 + r2, q2 * r1 + s2


@triton.jit
def _softplus(x):
    # log1p(e^x) with Goldberg's log1p trick (libdevice.log1p is missing in the interpreter): exact for
    # tiny e^x, where log(1 + e^x) would round to 0 and lose the step entirely.
    e = tl.exp(tl.minimum(x, 20.0))
    s = 1.0 + e
    lp = tl.where(s == 1.0, e, tl.log(s) * (e / (s - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _load_delta(delta_ptr, bias_ptr, offs_d, d_ok, t, t_ok, stride_dd,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta_t, d delta / d dt) on a [BLOCK_D, TILE_L] block (masked steps read dt = 0)."""
    dt = tl.load(delta_ptr + offs_d[:, None] * stride_dd + t[None, :],
                 mask=d_ok[:, None] & t_ok[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        return _softplus(dt), tl.sigmoid(dt)
    return dt, 1.0 + 0.0 * dt


@triton.jit
def _load_u_lag(u_ptr, offs_d, d_ok, t, L, stride_ud, J: tl.constexpr):
    """u_{t-J} on a [BLOCK_D, TILE_L] block, zero before t = 0 (the rule's empty history)."""
    s = t - J
    return tl.load(u_ptr + offs_d[:, None] * stride_ud + s[None, :],
                   mask=d_ok[:, None] & ((s >= 0) & (s < L))[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_row_lag(row_ptr, t, L, n_ok, J: tl.constexpr):
    """One state's B_{t-J} (or C) row on [TILE_L] steps, zero outside 0 <= t - J < L or past N."""
    s = t - J
    return tl.load(row_ptr + s, mask=n_ok & (s >= 0) & (s < L), other=0.0).to(tl.float32)


@triton.jit
def _at(x, lt, k):
    """x[:, k] of a [BLOCK_D, TILE_L] block (lt: the local step index); in-thread along time."""
    return tl.sum(tl.where(lt[None, :] == k, x, 0.0), axis=1)


@triton.jit
def _lag_split(x, lt, J: tl.constexpr, TILE_L: tl.constexpr):
    """Send x[:, s] of a [R, TILE_L] block to step s - J: (the part landing in this tile, the part
    landing in the tile before, at the same local index)."""
    g = tl.gather(x, tl.broadcast_to(((lt + J) % TILE_L)[None, :], x.shape), axis=1)
    inside = (lt + J < TILE_L)[None, :]
    return tl.where(inside, g, 0.0), tl.where(inside, 0.0, g)


@triton.jit
def _lag_split_row(x, lt, J: tl.constexpr, TILE_L: tl.constexpr):
    """_lag_split of a [TILE_L] row."""
    g = tl.gather(x, (lt + J) % TILE_L, axis=0)
    inside = lt + J < TILE_L
    return tl.where(inside, g, 0.0), tl.where(inside, 0.0, g)


@triton.jit
def _load_u_lags(u_ptr, offs_d, d_ok, t, L, stride_ud, HISTORY: tl.constexpr):
    u0 = _load_u_lag(u_ptr, offs_d, d_ok, t, L, stride_ud, 0)
    u1 = u0
    u2 = u0
    u3 = u0
    if HISTORY >= 1:
        u1 = _load_u_lag(u_ptr, offs_d, d_ok, t, L, stride_ud, 1)
    if HISTORY >= 2:
        u2 = _load_u_lag(u_ptr, offs_d, d_ok, t, L, stride_ud, 2)
    if HISTORY >= 3:
        u3 = _load_u_lag(u_ptr, offs_d, d_ok, t, L, stride_ud, 3)
    return u0, u1, u2, u3


@triton.jit
def _state_ok(t, d_ok, n, dstate):
    """(n valid on a [TILE_L] row, n valid on a [BLOCK_D] column): a trip of STATES may overshoot N."""
    return (t * 0 + n) < dstate, d_ok & ((d_ok.to(tl.int32) * 0 + n) < dstate)


@triton.jit
def _load_B_lags(B_row, t, L, n_ok, HISTORY: tl.constexpr):
    b0 = _load_row_lag(B_row, t, L, n_ok, 0)
    b1 = b0
    b2 = b0
    b3 = b0
    if HISTORY >= 1:
        b1 = _load_row_lag(B_row, t, L, n_ok, 1)
    if HISTORY >= 2:
        b2 = _load_row_lag(B_row, t, L, n_ok, 2)
    if HISTORY >= 3:
        b3 = _load_row_lag(B_row, t, L, n_ok, 3)
    return b0, b1, b2, b3


@triton.jit
def _input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY: tl.constexpr):
    """sum_j w_j v_{t-j} with v = B u, on a [BLOCK_D, TILE_L] block."""
    xw = w0 * (b0[None, :] * u0)
    if HISTORY >= 1:
        xw += w1 * (b1[None, :] * u1)
    if HISTORY >= 2:
        xw += w2 * (b2[None, :] * u2)
    if HISTORY >= 3:
        xw += w3 * (b3[None, :] * u3)
    return xw


# A state's work is split into load / compute / store so that a trip of STATES states issues every load
# before any store: the compiler cannot tell the carry store of state n from the carry load of state n+1,
# and would otherwise run the states' memory round trips one after the other.
@triton.jit
def _fwd_load(n, t, d_ok, A_row, B_ptr, C_ptr, s_Bn, s_Cn, carry_row, P_row, dstate, dim, L,
              HISTORY: tl.constexpr, SUMMARY: tl.constexpr):
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    h_in = tl.load(carry_row + n * dim, mask=dn_ok, other=0.0)
    a = tl.load(A_row + n * dim, mask=dn_ok, other=0.0).to(tl.float32)
    b0, b1, b2, b3 = _load_B_lags(B_ptr + n * s_Bn, t, L, n_ok, HISTORY)
    if SUMMARY:
        p = tl.load(P_row + n * dim, mask=dn_ok, other=1.0)
        c = b0
    else:
        p = h_in
        c = _load_row_lag(C_ptr + n * s_Cn, t, L, n_ok, 0)
    return h_in, a, b0, b1, b2, b3, c, p


@triton.jit
def _fwd_compute(ld, y, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS: tl.constexpr, HISTORY: tl.constexpr,
                 HAS_CLAMP: tl.constexpr, SUMMARY: tl.constexpr, TILE_L: tl.constexpr):
    """Scan one state over the tile from the carried state; add C h to y. Returns y, (h_in, h_end, P)."""
    h_in, a, b0, b1, b2, b3, c, p = ld
    zt = delta * a[:, None]
    if HAS_CLAMP:
        zt = tl.maximum(zt, z_clamp)
    abar, w0, w1, w2, w3 = COEFFS(zt)
    xw = _input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY)
    # Steps past L are the identity map, so the last column is the state at the end of the tile.
    abar = tl.where(t_ok[None, :], abar, 1.0)
    x = tl.where(t_ok[None, :], delta * xw, 0.0)
    a_cum, x_cum = tl.associative_scan((abar, x), axis=1, combine_fn=_affine_combine)
    h = a_cum * h_in[:, None] + x_cum
    if SUMMARY:
        p = p * _at(a_cum, lt, TILE_L - 1)
    else:
        y += c[None, :] * h
    return y, (h_in, _at(h, lt, TILE_L - 1), p)


@triton.jit
def _fwd_store(n, st, t, d_ok, tile, seg_ok, carry_row, P_row, state_row, dstate, dim,
               SUMMARY: tl.constexpr, SEG: tl.constexpr):
    h_in, h_end, p = st
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    if SUMMARY:
        tl.store(P_row + n * dim, p, mask=dn_ok)
    else:
        tl.store(state_row + ((tile // SEG) * dstate + n) * dim, h_in, mask=seg_ok & dn_ok)
    tl.store(carry_row + n * dim, h_end, mask=dn_ok)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, gate_ptr, bias_ptr,
    carry_ptr,              # (batch, n_chunks, N, dim): the chunk's start state in, its end state out
    P_ptr,                  # SUMMARY: (batch, n_chunks, N, dim) prod Abar over the chunk (starts at 1)
    out_ptr, states_ptr,    # out (batch, dim, L); states (batch, n_segs, N, dim): h before every segment
    dim, L, dstate, group_size, n_tiles, n_segs, n_chunks, tiles_per_chunk, z_clamp,
    s_ub, s_ud, s_db, s_dd, s_gb, s_gd, s_ob, s_od, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn,
    COEFFS: tl.constexpr, HISTORY: tl.constexpr, HAS_CLAMP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SUMMARY: tl.constexpr, SEG: tl.constexpr, BLOCK_D: tl.constexpr, TILE_L: tl.constexpr, STATES: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    # A block never straddles two groups (the launcher picks BLOCK_D so).
    g_idx = (pid_d * BLOCK_D) // group_size
    u_ptr += pid_b * s_ub
    delta_ptr += pid_b * s_db
    B_ptr += pid_b * s_Bb + g_idx * s_Bg
    C_ptr += pid_b * s_Cb + g_idx * s_Cg
    # per-(channel, state) buffers are (..., N, dim): a state's column of channels is contiguous
    A_row = A_ptr + offs_d
    carry_row = carry_ptr + (pid_b * n_chunks + pid_c) * dstate * dim + offs_d
    P_row = P_ptr + (pid_b * n_chunks + pid_c) * dstate * dim + offs_d
    state_row = states_ptr + pid_b * n_segs * dstate * dim + offs_d
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    lt = tl.arange(0, TILE_L)
    # while, not range(): the interpreter cannot turn a runtime scalar into a Python int (numpy 2.4).
    # Tiles past n_tiles (the last chunk may be short) are all-masked identity steps.
    i = 0
    while i < tiles_per_chunk:
        tile = pid_c * tiles_per_chunk + i
        i += 1
        t = tile * TILE_L + lt
        t_ok = t < L
        td_ok = d_ok[:, None] & t_ok[None, :]
        seg_ok = d_ok & ((offs_d * 0 + tile) % SEG == 0) & ((offs_d * 0 + tile) < n_tiles)
        delta, _ = _load_delta(delta_ptr, bias_ptr, offs_d, d_ok, t, t_ok, s_dd, HAS_BIAS, SOFTPLUS)
        u0, u1, u2, u3 = _load_u_lags(u_ptr, offs_d, d_ok, t, L, s_ud, HISTORY)
        y = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        # STATES states per trip: all their loads, then the scans, then the stores (see _fwd_load)
        n = 0
        while n < dstate:
            l0 = _fwd_load(n, t, d_ok, A_row, B_ptr, C_ptr, s_Bn, s_Cn, carry_row, P_row, dstate, dim, L,
                           HISTORY, SUMMARY)
            if STATES >= 2:
                l1 = _fwd_load(n + 1, t, d_ok, A_row, B_ptr, C_ptr, s_Bn, s_Cn, carry_row, P_row, dstate, dim, L,
                               HISTORY, SUMMARY)
            if STATES >= 4:
                l2 = _fwd_load(n + 2, t, d_ok, A_row, B_ptr, C_ptr, s_Bn, s_Cn, carry_row, P_row, dstate, dim, L,
                               HISTORY, SUMMARY)
                l3 = _fwd_load(n + 3, t, d_ok, A_row, B_ptr, C_ptr, s_Bn, s_Cn, carry_row, P_row, dstate, dim, L,
                               HISTORY, SUMMARY)
            y, s0 = _fwd_compute(l0, y, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                 SUMMARY, TILE_L)
            if STATES >= 2:
                y, s1 = _fwd_compute(l1, y, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                     SUMMARY, TILE_L)
            if STATES >= 4:
                y, s2 = _fwd_compute(l2, y, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                     SUMMARY, TILE_L)
                y, s3 = _fwd_compute(l3, y, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                     SUMMARY, TILE_L)
            _fwd_store(n, s0, t, d_ok, tile, seg_ok, carry_row, P_row, state_row, dstate, dim, SUMMARY, SEG)
            if STATES >= 2:
                _fwd_store(n + 1, s1, t, d_ok, tile, seg_ok, carry_row, P_row, state_row, dstate, dim, SUMMARY, SEG)
            if STATES >= 4:
                _fwd_store(n + 2, s2, t, d_ok, tile, seg_ok, carry_row, P_row, state_row, dstate, dim, SUMMARY, SEG)
                _fwd_store(n + 3, s3, t, d_ok, tile, seg_ok, carry_row, P_row, state_row, dstate, dim, SUMMARY, SEG)
            n += STATES
        if not SUMMARY:
            if HAS_D:
                y += Dv[:, None] * u0
            if HAS_GATE:
                gt = tl.load(gate_ptr + pid_b * s_gb + offs_d[:, None] * s_gd + t[None, :],
                             mask=td_ok, other=0.0).to(tl.float32)
                y = y * (gt * tl.sigmoid(gt))
            tl.store(out_ptr + pid_b * s_ob + offs_d[:, None] * s_od + t[None, :], y, mask=td_ok)
        # the carry written by one thread may be read by another in the next tile
        tl.debug_barrier()


@triton.jit
def _chunk_carry_kernel(P_ptr, R_ptr, carry_ptr, init_ptr, n_rows, n_cols, n_chunks,
                        HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Sequential pass over chunks: carry[c] = P[c'] carry[c'] + R[c'] with c' the chunk before c
    (forward: c - 1, reverse: c + 1), on (n_rows, n_chunks, n_cols) buffers. carry may be R itself: each
    slot is read before it is overwritten."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_rows * n_cols
    row = offs // n_cols
    col = offs % n_cols
    base = row * n_chunks * n_cols + col
    if HAS_INIT:
        carry = tl.load(init_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    i = 0
    while i < n_chunks:  # while: see _scan_fwd_kernel
        if REVERSE:
            c = n_chunks - 1 - i
        else:
            c = i
        i += 1
        p = tl.load(P_ptr + base + c * n_cols, mask=ok, other=1.0)
        r = tl.load(R_ptr + base + c * n_cols, mask=ok, other=0.0)
        tl.store(carry_ptr + base + c * n_cols, carry, mask=ok)
        carry = p * carry + r


@triton.jit
def _bsum_load(n, t, d_ok, A_row, C_ptr, s_Cn, P_row, R_row, dstate, dim, L):
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    return (tl.load(A_row + n * dim, mask=dn_ok, other=0.0).to(tl.float32),
            _load_row_lag(C_ptr + n * s_Cn, t, L, n_ok, 0),
            tl.load(R_row + n * dim, mask=dn_ok, other=0.0), tl.load(P_row + n * dim, mask=dn_ok, other=1.0))


@triton.jit
def _bsum_compute(ld, delta, dy, t_ok, lt, z_clamp, COEFFS: tl.constexpr, HAS_CLAMP: tl.constexpr,
                  TILE_L: tl.constexpr):
    """g_t = Abar_t (g_{t+1} + C_t dy_t) over the tile in reverse time; returns (g at its start, P)."""
    a, c, g, p = ld
    zt = delta * a[:, None]
    if HAS_CLAMP:
        zt = tl.maximum(zt, z_clamp)
    abar, w0, w1, w2, w3 = COEFFS(zt)
    abar = tl.where(t_ok[None, :], abar, 1.0)
    cdy = c[None, :] * dy
    # reverse time as a forward scan of the flipped run (flips are register renames; reverse=True is
    # not: it shuffles across lanes that hold other channels)
    p_cum, r_cum = tl.associative_scan((tl.flip(abar, 1), tl.flip(abar * cdy, 1)), axis=1,
                                       combine_fn=_affine_combine)
    p0 = _at(p_cum, lt, TILE_L - 1)
    return p0 * g + _at(r_cum, lt, TILE_L - 1), p * p0


@triton.jit
def _bsum_store(n, st, t, d_ok, P_row, R_row, dstate, dim):
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    tl.store(R_row + n * dim, st[0], mask=dn_ok)
    tl.store(P_row + n * dim, st[1], mask=dn_ok)


@triton.jit
def _rec_load(n, kk, t, d_ok, A_row, Bp, s_Bn, scratch_row, dstate, dim, L, HISTORY: tl.constexpr,
              BLOCK_D: tl.constexpr):
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    b0, b1, b2, b3 = _load_B_lags(Bp + n * s_Bn, t, L, n_ok, HISTORY)
    return (tl.load(A_row + n * dim, mask=dn_ok, other=0.0).to(tl.float32), b0, b1, b2, b3,
            tl.load(scratch_row + (kk * dstate + n) * BLOCK_D, mask=dn_ok, other=0.0))


@triton.jit
def _rec_compute(ld, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS: tl.constexpr, HISTORY: tl.constexpr,
                 HAS_CLAMP: tl.constexpr, TILE_L: tl.constexpr):
    """h at the end of a tile from h at its start (forward only)."""
    a, b0, b1, b2, b3, h_in = ld
    zt = delta * a[:, None]
    if HAS_CLAMP:
        zt = tl.maximum(zt, z_clamp)
    abar, w0, w1, w2, w3 = COEFFS(zt)
    xw = _input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY)
    abar = tl.where(t_ok[None, :], abar, 1.0)
    x = tl.where(t_ok[None, :], delta * xw, 0.0)
    a_cum, x_cum = tl.associative_scan((abar, x), axis=1, combine_fn=_affine_combine)
    return _at(a_cum, lt, TILE_L - 1) * h_in + _at(x_cum, lt, TILE_L - 1)


@triton.jit
def _rec_store(n, h_end, kk, t, d_ok, scratch_row, dstate, BLOCK_D: tl.constexpr):
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    tl.store(scratch_row + ((kk + 1) * dstate + n) * BLOCK_D, h_end, mask=dn_ok)


@triton.jit
def _scan_bwd_summary_kernel(
    delta_ptr, A_ptr, C_ptr, gate_ptr, bias_ptr, dout_ptr,
    P_ptr, R_ptr,   # (batch, n_chunks, N, dim): prod Abar (starts at 1), g at the chunk start from g = 0 after it
    dim, L, dstate, group_size, n_chunks, tiles_per_chunk, z_clamp,
    s_db, s_dd, s_gb, s_gd, s_Cb, s_Cg, s_Cn, s_dob, s_dod,
    COEFFS: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, TILE_L: tl.constexpr, STATES: tl.constexpr,
):
    """Per chunk, in reverse time: g_t = Abar_t dh_t = Abar_t (g_{t+1} + C_t dy_t) started from 0."""
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    g_idx = (pid_d * BLOCK_D) // group_size
    delta_ptr += pid_b * s_db
    C_ptr += pid_b * s_Cb + g_idx * s_Cg
    A_row = A_ptr + offs_d
    P_row = P_ptr + (pid_b * n_chunks + pid_c) * dstate * dim + offs_d
    R_row = R_ptr + (pid_b * n_chunks + pid_c) * dstate * dim + offs_d
    lt = tl.arange(0, TILE_L)
    i = 0
    while i < tiles_per_chunk:  # while: see _scan_fwd_kernel
        tile = pid_c * tiles_per_chunk + tiles_per_chunk - 1 - i
        i += 1
        t = tile * TILE_L + lt
        t_ok = t < L
        td_ok = d_ok[:, None] & t_ok[None, :]
        delta, _ = _load_delta(delta_ptr, bias_ptr, offs_d, d_ok, t, t_ok, s_dd, HAS_BIAS, SOFTPLUS)
        dy = tl.load(dout_ptr + pid_b * s_dob + offs_d[:, None] * s_dod + t[None, :],
                     mask=td_ok, other=0.0).to(tl.float32)
        if HAS_GATE:
            gt = tl.load(gate_ptr + pid_b * s_gb + offs_d[:, None] * s_gd + t[None, :],
                         mask=td_ok, other=0.0).to(tl.float32)
            dy = dy * (gt * tl.sigmoid(gt))
        n = 0
        while n < dstate:  # STATES states per trip: loads, scans, stores (see _fwd_load)
            l0 = _bsum_load(n, t, d_ok, A_row, C_ptr, s_Cn, P_row, R_row, dstate, dim, L)
            if STATES >= 2:
                l1 = _bsum_load(n + 1, t, d_ok, A_row, C_ptr, s_Cn, P_row, R_row, dstate, dim, L)
            if STATES >= 4:
                l2 = _bsum_load(n + 2, t, d_ok, A_row, C_ptr, s_Cn, P_row, R_row, dstate, dim, L)
                l3 = _bsum_load(n + 3, t, d_ok, A_row, C_ptr, s_Cn, P_row, R_row, dstate, dim, L)
            s0 = _bsum_compute(l0, delta, dy, t_ok, lt, z_clamp, COEFFS, HAS_CLAMP, TILE_L)
            if STATES >= 2:
                s1 = _bsum_compute(l1, delta, dy, t_ok, lt, z_clamp, COEFFS, HAS_CLAMP, TILE_L)
            if STATES >= 4:
                s2 = _bsum_compute(l2, delta, dy, t_ok, lt, z_clamp, COEFFS, HAS_CLAMP, TILE_L)
                s3 = _bsum_compute(l3, delta, dy, t_ok, lt, z_clamp, COEFFS, HAS_CLAMP, TILE_L)
            _bsum_store(n, s0, t, d_ok, P_row, R_row, dstate, dim)
            if STATES >= 2:
                _bsum_store(n + 1, s1, t, d_ok, P_row, R_row, dstate, dim)
            if STATES >= 4:
                _bsum_store(n + 2, s2, t, d_ok, P_row, R_row, dstate, dim)
                _bsum_store(n + 3, s3, t, d_ok, P_row, R_row, dstate, dim)
            n += STATES
        tl.debug_barrier()


@triton.jit
def _bwd_load(n, t, t_ok, lt, d_ok, row_ok, rt_ok, A_row, Bp, Cp, s_Bn, s_Cn, h_row, G_row, dA_row, dB_part_ptr,
              dC_part_ptr, dB_halo_ptr, part_row, chunk_t0, pid_c, n_chunks, dstate, dim, L,
              HISTORY: tl.constexpr, TILE_L: tl.constexpr, HALO: tl.constexpr, BLOCK_D: tl.constexpr):
    """Everything one backward state reads, read-add-write operands included (see _fwd_load)."""
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    b0, b1, b2, b3 = _load_B_lags(Bp + n * s_Bn, t, L, n_ok, HISTORY)
    rt_ok = rt_ok & n_ok
    dB = tl.load(dB_part_ptr + (part_row + n) * L + t, mask=rt_ok, other=0.0)
    dC = tl.load(dC_part_ptr + (part_row + n) * L + t, mask=rt_ok, other=0.0)
    spill = dB
    halo = dB
    if HISTORY >= 1:
        # the last HALO steps of the previous tile: in this chunk, or the previous chunk's halo
        prev = t - TILE_L
        in_halo = row_ok & n_ok & (lt >= TILE_L - HALO)
        spill = tl.load(dB_part_ptr + (part_row + n) * L + prev, mask=in_halo & (prev >= chunk_t0), other=0.0)
        halo = tl.load(dB_halo_ptr + ((part_row + n) * n_chunks + pid_c) * HALO + lt - (TILE_L - HALO),
                       mask=in_halo & (prev < chunk_t0) & (prev >= 0), other=0.0)
    return (tl.load(A_row + n * dim, mask=dn_ok, other=0.0).to(tl.float32),
            tl.load(h_row + n * BLOCK_D, mask=dn_ok, other=0.0), tl.load(G_row + n * dim, mask=dn_ok, other=0.0),
            b0, b1, b2, b3, _load_row_lag(Cp + n * s_Cn, t, L, n_ok, 0),
            tl.load(dA_row + n * dim, mask=dn_ok, other=0.0), dB, dC, spill, halo)


@triton.jit
def _bwd_compute(ld, y, R0, R1, R2, R3, ddelta, delta, dy, u0, u1, u2, u3, t_ok, lt, z_clamp,
                 COEFFS_GRAD: tl.constexpr, HISTORY: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_GATE: tl.constexpr,
                 TILE_L: tl.constexpr):
    """One state of a backward tile: recompute h, reverse-scan dh, add every gradient term."""
    a, h_before, g_after, b0, b1, b2, b3, c, dA, dB, dC, dB_spill, dB_halo = ld
    z_raw = delta * a[:, None]
    if HAS_CLAMP:
        zt = tl.maximum(z_raw, z_clamp)
    else:
        zt = z_raw
    abar, w0, w1, w2, w3, dabar, dw0, dw1, dw2, dw3 = COEFFS_GRAD(zt)
    # sum_j w_j v_{t-j} and sum_j w_j' v_{t-j}
    xw = _input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY)
    xdw = _input_sum(dw0, dw1, dw2, dw3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY)
    abar = tl.where(t_ok[None, :], abar, 1.0)
    x = tl.where(t_ok[None, :], delta * xw, 0.0)
    one = 1.0 + 0.0 * abar
    p, q, r, s = tl.associative_scan((abar, one, x, 0.0 * abar), axis=1, combine_fn=_affine_lag_combine)
    h = p * h_before[:, None] + r
    h_prev = q * h_before[:, None] + s
    if HAS_GATE:
        y += c[None, :] * h
    cdy = c[None, :] * dy
    # g_t = Abar_t dh_t = Abar_t (g_{t+1} + c_t): the scan returns g_{t+1} beside g_t; reverse time as a
    # forward scan of the flipped run (see _bsum_compute)
    p, q, r, s = tl.associative_scan((tl.flip(abar, 1), one, tl.flip(abar * cdy, 1), 0.0 * abar),
                                     axis=1, combine_fn=_affine_lag_combine)
    dh = tl.where(t_ok[None, :], tl.flip(q * g_after[:, None] + s, 1) + cdy, 0.0)
    g_new = _at(p, lt, TILE_L - 1) * g_after + _at(r, lt, TILE_L - 1)
    dzt = dh * (dabar * h_prev + delta * xdw)
    if HAS_CLAMP:
        dzt = tl.where(z_raw >= z_clamp, dzt, 0.0)
    ddelta += dh * xw + dzt * a[:, None]
    dA += tl.sum(dzt * delta, axis=1)
    dC += tl.sum(dy * h, axis=0)
    # input gradients: dv_{t-j} += dh_t delta_t w_j(z_t); du gathers over states (R_j), dB over channels
    qd = dh * delta
    qj = qd * w0
    R0 += qj * b0[None, :]
    dB += tl.sum(qj * u0, axis=0)
    if HISTORY >= 1:
        qj = qd * w1
        R1 += qj * b1[None, :]
        own, spill = _lag_split_row(tl.sum(qj * u1, axis=0), lt, 1, TILE_L)
        dB += own
        dB_spill += spill
        dB_halo += spill
    if HISTORY >= 2:
        qj = qd * w2
        R2 += qj * b2[None, :]
        own, spill = _lag_split_row(tl.sum(qj * u2, axis=0), lt, 2, TILE_L)
        dB += own
        dB_spill += spill
        dB_halo += spill
    if HISTORY >= 3:
        qj = qd * w3
        R3 += qj * b3[None, :]
        own, spill = _lag_split_row(tl.sum(qj * u3, axis=0), lt, 3, TILE_L)
        dB += own
        dB_spill += spill
        dB_halo += spill
    return y, R0, R1, R2, R3, ddelta, (g_new, dA, dB, dC, dB_spill, dB_halo)


@triton.jit
def _bwd_store(n, st, t, lt, d_ok, row_ok, rt_ok, G_row, dA_row, dB_part_ptr, dC_part_ptr, dB_halo_ptr, part_row,
               chunk_t0, pid_c, n_chunks, dstate, dim, L, HISTORY: tl.constexpr, TILE_L: tl.constexpr,
               HALO: tl.constexpr):
    g_new, dA, dB, dC, dB_spill, dB_halo = st
    n_ok, dn_ok = _state_ok(t, d_ok, n, dstate)
    tl.store(G_row + n * dim, g_new, mask=dn_ok)
    tl.store(dA_row + n * dim, dA, mask=dn_ok)
    # this program alone adds to these partial rows (its split, batch, chunk)
    rt_ok = rt_ok & n_ok
    tl.store(dB_part_ptr + (part_row + n) * L + t, dB, mask=rt_ok)
    tl.store(dC_part_ptr + (part_row + n) * L + t, dC, mask=rt_ok)
    if HISTORY >= 1:
        prev = t - TILE_L
        in_halo = row_ok & n_ok & (lt >= TILE_L - HALO)
        tl.store(dB_part_ptr + (part_row + n) * L + prev, dB_spill, mask=in_halo & (prev >= chunk_t0))
        tl.store(dB_halo_ptr + ((part_row + n) * n_chunks + pid_c) * HALO + lt - (TILE_L - HALO), dB_halo,
                 mask=in_halo & (prev < chunk_t0) & (prev >= 0))


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, gate_ptr, bias_ptr, dout_ptr,
    states_ptr,                     # (batch, n_segs, N, dim) from the forward
    carry_ptr,                      # (batch, n_chunks, N, dim): g after the chunk; updated in place
    scratch_ptr,                    # (programs, SEG, N, BLOCK_D): states at the tile starts of a segment
    du_ptr, ddelta_ptr, dgate_ptr,
    dB_part_ptr, dC_part_ptr,       # (d_split, batch, G, N, L) fp32, zero-filled; this program adds its channels
    dA_part_ptr,                    # (batch, n_chunks, N, dim), zero-filled
    dD_part_ptr, dbias_part_ptr,    # (batch, n_chunks, dim)
    du_halo_ptr, dB_halo_ptr,       # (batch, dim, n_chunks, K) / (d_split, batch, G, N, n_chunks, K), zero-filled
    dim, L, dstate, n_groups, group_size, n_tiles, n_segs, n_chunks, tiles_per_chunk, n_dblocks,
    dblocks_per_split, z_clamp,
    s_ub, s_ud, s_db, s_dd, s_gb, s_gd, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_dob, s_dod,
    s_dub, s_dud, s_ddb, s_ddd, s_dgb, s_dgd,
    COEFFS: tl.constexpr, COEFFS_GRAD: tl.constexpr, HISTORY: tl.constexpr, HAS_CLAMP: tl.constexpr,
    HAS_D: tl.constexpr, HAS_GATE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SEG: tl.constexpr, BLOCK_D: tl.constexpr, TILE_L: tl.constexpr, HALO: tl.constexpr, STATES: tl.constexpr,
    STATES_BWD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    lt = tl.arange(0, TILE_L)
    lane_d = tl.arange(0, BLOCK_D)
    u_ptr += pid_b * s_ub
    delta_ptr += pid_b * s_db
    chunk_t0 = pid_c * tiles_per_chunk * TILE_L
    scratch_row = (scratch_ptr + ((pid_b * n_chunks + pid_c) * tl.num_programs(2) + pid_s) * SEG * dstate * BLOCK_D
                   + lane_d)
    # while, not range(): see _scan_fwd_kernel. A channel block past n_dblocks is fully masked.
    k = 0
    while k < dblocks_per_split:
        db = pid_s * dblocks_per_split + k
        k += 1
        offs_d = db * BLOCK_D + lane_d
        d_ok = offs_d < dim
        row_ok = (lt * 0 + db) < n_dblocks  # this block may touch the dB/dC rows
        g_idx = (db * BLOCK_D) // group_size
        Bp = B_ptr + pid_b * s_Bb + g_idx * s_Bg
        Cp = C_ptr + pid_b * s_Cb + g_idx * s_Cg
        # per-(channel, state) buffers are (..., N, dim), the scratch (..., N, BLOCK_D): see the forward
        A_row = A_ptr + offs_d
        G_row = carry_ptr + (pid_b * n_chunks + pid_c) * dstate * dim + offs_d
        dA_row = dA_part_ptr + (pid_b * n_chunks + pid_c) * dstate * dim + offs_d
        state_row = states_ptr + pid_b * n_segs * dstate * dim + offs_d
        # first dB/dC row of this (split, batch, group); the state n adds n
        part_row = ((pid_s * tl.num_programs(0) + pid_b) * n_groups + g_idx) * dstate
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        du_spill = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        js = 0
        while js < tiles_per_chunk // SEG:
            seg = pid_c * (tiles_per_chunk // SEG) + tiles_per_chunk // SEG - 1 - js
            js += 1
            # (1) h at each tile start of this segment, from the saved segment state, into the scratch
            n = 0
            while n < dstate:
                tl.store(scratch_row + n * BLOCK_D,
                         tl.load(state_row + (seg * dstate + n) * dim, mask=d_ok, other=0.0))
                n += 1
            tl.debug_barrier()
            kk = 0
            while kk < SEG - 1:
                t = (seg * SEG + kk) * TILE_L + lt
                t_ok = t < L
                delta, _ = _load_delta(delta_ptr, bias_ptr, offs_d, d_ok, t, t_ok, s_dd, HAS_BIAS, SOFTPLUS)
                u0, u1, u2, u3 = _load_u_lags(u_ptr, offs_d, d_ok, t, L, s_ud, HISTORY)
                n = 0
                while n < dstate:  # STATES states per trip: loads, scans, stores (see _fwd_load)
                    l0 = _rec_load(n, kk, t, d_ok, A_row, Bp, s_Bn, scratch_row, dstate, dim, L, HISTORY,
                                      BLOCK_D)
                    if STATES >= 2:
                        l1 = _rec_load(n + 1, kk, t, d_ok, A_row, Bp, s_Bn, scratch_row, dstate, dim, L, HISTORY,
                                      BLOCK_D)
                    if STATES >= 4:
                        l2 = _rec_load(n + 2, kk, t, d_ok, A_row, Bp, s_Bn, scratch_row, dstate, dim, L, HISTORY,
                                      BLOCK_D)
                        l3 = _rec_load(n + 3, kk, t, d_ok, A_row, Bp, s_Bn, scratch_row, dstate, dim, L, HISTORY,
                                      BLOCK_D)
                    s0 = _rec_compute(l0, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP, TILE_L)
                    if STATES >= 2:
                        s1 = _rec_compute(l1, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                          TILE_L)
                    if STATES >= 4:
                        s2 = _rec_compute(l2, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                          TILE_L)
                        s3 = _rec_compute(l3, delta, u0, u1, u2, u3, t_ok, lt, z_clamp, COEFFS, HISTORY, HAS_CLAMP,
                                          TILE_L)
                    _rec_store(n, s0, kk, t, d_ok, scratch_row, dstate, BLOCK_D)
                    if STATES >= 2:
                        _rec_store(n + 1, s1, kk, t, d_ok, scratch_row, dstate, BLOCK_D)
                    if STATES >= 4:
                        _rec_store(n + 2, s2, kk, t, d_ok, scratch_row, dstate, BLOCK_D)
                        _rec_store(n + 3, s3, kk, t, d_ok, scratch_row, dstate, BLOCK_D)
                    n += STATES
                kk += 1
            tl.debug_barrier()
            # (2) the segment's tiles in reverse
            kk = 0
            while kk < SEG:
                tile = seg * SEG + SEG - 1 - kk
                t = tile * TILE_L + lt
                t_ok = t < L
                td_ok = d_ok[:, None] & t_ok[None, :]
                rt_ok = row_ok & t_ok
                delta, ddelta_ddt = _load_delta(delta_ptr, bias_ptr, offs_d, d_ok, t, t_ok, s_dd, HAS_BIAS,
                                                SOFTPLUS)
                u0, u1, u2, u3 = _load_u_lags(u_ptr, offs_d, d_ok, t, L, s_ud, HISTORY)
                dout = tl.load(dout_ptr + pid_b * s_dob + offs_d[:, None] * s_dod + t[None, :],
                               mask=td_ok, other=0.0).to(tl.float32)
                if HAS_GATE:
                    gt = tl.load(gate_ptr + pid_b * s_gb + offs_d[:, None] * s_gd + t[None, :],
                                 mask=td_ok, other=0.0).to(tl.float32)
                    sig = tl.sigmoid(gt)
                    dy = dout * gt * sig
                else:
                    dy = dout
                y = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
                # du_t = sum_n sum_j [dh delta w_j]_{t+j} B_t: R_j collects sum_n dh delta w_j B_{t-j} at the
                # step it comes from; it is shifted j steps back once per tile, after the state loop.
                R0 = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
                R1 = R0
                R2 = R0
                R3 = R0
                ddelta = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
                h_row = scratch_row + (SEG - 1 - kk) * dstate * BLOCK_D
                n = 0
                while n < dstate:  # STATES_BWD states per trip: loads, compute, stores (see _fwd_load)
                    l0 = _bwd_load(n, t, t_ok, lt, d_ok, row_ok, rt_ok, A_row, Bp, Cp, s_Bn, s_Cn, h_row, G_row,
                                   dA_row, dB_part_ptr, dC_part_ptr, dB_halo_ptr, part_row, chunk_t0, pid_c, n_chunks,
                                   dstate, dim, L, HISTORY, TILE_L, HALO, BLOCK_D)
                    if STATES_BWD >= 2:
                        l1 = _bwd_load(n + 1, t, t_ok, lt, d_ok, row_ok, rt_ok, A_row, Bp, Cp, s_Bn, s_Cn, h_row, G_row,
                                       dA_row, dB_part_ptr, dC_part_ptr, dB_halo_ptr, part_row, chunk_t0, pid_c,
                                       n_chunks, dstate, dim, L, HISTORY, TILE_L, HALO, BLOCK_D)
                    y, R0, R1, R2, R3, ddelta, s0 = _bwd_compute(
                        l0, y, R0, R1, R2, R3, ddelta, delta, dy, u0, u1, u2, u3, t_ok, lt, z_clamp,
                        COEFFS_GRAD, HISTORY, HAS_CLAMP, HAS_GATE, TILE_L)
                    if STATES_BWD >= 2:
                        y, R0, R1, R2, R3, ddelta, s1 = _bwd_compute(
                            l1, y, R0, R1, R2, R3, ddelta, delta, dy, u0, u1, u2, u3, t_ok, lt, z_clamp,
                            COEFFS_GRAD, HISTORY, HAS_CLAMP, HAS_GATE, TILE_L)
                    _bwd_store(n, s0, t, lt, d_ok, row_ok, rt_ok, G_row, dA_row, dB_part_ptr, dC_part_ptr, dB_halo_ptr,
                               part_row, chunk_t0, pid_c, n_chunks, dstate, dim, L, HISTORY, TILE_L, HALO)
                    if STATES_BWD >= 2:
                        _bwd_store(n + 1, s1, t, lt, d_ok, row_ok, rt_ok, G_row, dA_row, dB_part_ptr, dC_part_ptr,
                                   dB_halo_ptr, part_row, chunk_t0, pid_c, n_chunks, dstate, dim, L, HISTORY, TILE_L,
                                   HALO)
                    n += STATES_BWD
                kk += 1
                du = R0 + du_spill
                if HISTORY >= 1:
                    own, du_spill = _lag_split(R1, lt, 1, TILE_L)
                    du += own
                if HISTORY >= 2:
                    own, spill = _lag_split(R2, lt, 2, TILE_L)
                    du += own
                    du_spill += spill
                if HISTORY >= 3:
                    own, spill = _lag_split(R3, lt, 3, TILE_L)
                    du += own
                    du_spill += spill
                if HAS_D:
                    du += dy * Dv[:, None]
                    dD_acc += tl.sum(dy * u0, axis=1)
                if HAS_GATE:
                    if HAS_D:
                        y += Dv[:, None] * u0
                    # d silu(g)/dg = sig (1 + g (1 - sig))
                    tl.store(dgate_ptr + pid_b * s_dgb + offs_d[:, None] * s_dgd + t[None, :],
                             dout * y * sig * (1.0 + gt * (1.0 - sig)), mask=td_ok)
                ddt = ddelta * ddelta_ddt
                dbias_acc += tl.sum(tl.where(td_ok, ddt, 0.0), axis=1)
                tl.store(du_ptr + pid_b * s_dub + offs_d[:, None] * s_dud + t[None, :], du, mask=td_ok)
                tl.store(ddelta_ptr + pid_b * s_ddb + offs_d[:, None] * s_ddd + t[None, :], ddt, mask=td_ok)
                # the next tile (and channel block) reads back the carries and partial rows written here
                tl.debug_barrier()
        at = (pid_b * n_chunks + pid_c) * dim + offs_d
        tl.store(dD_part_ptr + at, dD_acc, mask=d_ok)
        tl.store(dbias_part_ptr + at, dbias_acc, mask=d_ok)
        if HISTORY >= 1:
            # what the chunk's first tile sends into the previous chunk (its last HALO steps)
            kh = lt - (TILE_L - HALO)
            du_halo = du_halo_ptr + ((pid_b * dim + offs_d[:, None]) * n_chunks + pid_c) * HALO + kh[None, :]
            tl.store(du_halo, du_spill, mask=d_ok[:, None] & ((kh >= 0) & (lt * 0 + pid_c > 0))[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScanConfig:
    """Launch shape. None picks by hand (no autotuning: the kernels write in place).

    tile_l: steps per thread-run (a power of two >= 4; 8 = one 16-byte bf16 vector); seg_tiles: tiles per
    saved state (forward and backward must agree); block_d / block_d_bwd: channels per program;
    chunk_tiles / bwd_chunk_tiles: tiles per chunk, a multiple of seg_tiles (chunks run in parallel);
    d_split: channel splits of the backward (one dB/dC partial each); programs_per_sm: how many programs
    per multiprocessor the chunking aims for; states_per_trip: states unrolled per trip of the state loop
    (independent chains for the scheduler to overlap; 1 by default: on an H200 four cost registers and were
    no faster, docs/performance.md); num_warps*, maxnreg*: passed to the launches.
    """
    tile_l: int = None
    seg_tiles: int = None
    block_d: int = None
    block_d_bwd: int = None
    chunk_tiles: int = None
    bwd_chunk_tiles: int = None
    d_split: int = None
    programs_per_sm: int = None
    states_per_trip: int = None
    states_per_trip_bwd: int = None
    num_warps: int = None
    num_warps_bwd: int = None
    maxnreg: int = None
    maxnreg_bwd: int = None


def _pow2_divisor(n):
    return n & -n


def _resolve_config(cfg, u, n_groups):
    dim = u.shape[1]
    tile_l = cfg.tile_l or 8
    seg = cfg.seg_tiles or 4
    if tile_l < MAX_HISTORY + 1 or tile_l & (tile_l - 1):
        raise ValueError(f'tile_l must be a power of two >= {MAX_HISTORY + 1}, got {tile_l}')
    if cfg.states_per_trip not in (None, 1, 2, 4) or cfg.states_per_trip_bwd not in (None, 1, 2):
        raise ValueError('states_per_trip must be 1, 2 or 4 and states_per_trip_bwd 1 or 2')
    for name in ('chunk_tiles', 'bwd_chunk_tiles'):
        if getattr(cfg, name) and getattr(cfg, name) % seg:
            raise ValueError(f'{name}={getattr(cfg, name)} must be a multiple of seg_tiles={seg}')
    block_d = cfg.block_d or 32
    block_d_bwd = cfg.block_d_bwd or 32
    if n_groups > 1:
        # a channel block must not straddle two groups of B/C
        cap = _pow2_divisor(dim // n_groups)
        block_d, block_d_bwd = min(block_d, cap), min(block_d_bwd, cap)
    # one warp holds 32 channels, a thread one channel's TILE_L steps
    return replace(cfg, tile_l=tile_l, seg_tiles=seg, block_d=block_d, block_d_bwd=block_d_bwd,
                   programs_per_sm=cfg.programs_per_sm or 8, states_per_trip=cfg.states_per_trip or 1,
                   states_per_trip_bwd=cfg.states_per_trip_bwd or 1,
                   num_warps=cfg.num_warps or max(1, block_d // 32),
                   num_warps_bwd=cfg.num_warps_bwd or max(1, block_d_bwd // 32))


def _launch_opts(num_warps, maxnreg):
    return dict(num_warps=num_warps, **({'maxnreg': maxnreg} if maxnreg else {}))


def _programs_wanted(device, cfg):
    if device.type != 'cuda':
        return 1
    return cfg.programs_per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _chunking(n_segs, seg, rows, wanted, forced):
    """Tiles per chunk (whole segments) so that rows x chunks reaches the programs wanted."""
    if forced:
        return forced
    return seg * triton.cdiv(n_segs, max(1, triton.cdiv(wanted, rows)))


def _rule_args(rule):
    z_clamp = getattr(rule, 'z_clamp', None)
    return dict(HAS_CLAMP=z_clamp is not None), (0.0 if z_clamp is None else float(z_clamp))


def _as_groups(BC):
    """(batch, N, L) -> a (batch, 1, N, L) view; (batch, G, N, L) passes through."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _selective_scan_fwd(u, delta, A, B, C, D, gate, delta_bias, delta_softplus, rule, cfg):
    """Returns out (u's dtype), states (batch, dim, n_segs, N) fp32 [h before each segment], last state."""
    batch, dim, L = u.shape
    dstate = A.shape[0]  # A arrives transposed, (N, dim)
    n_groups = B.shape[1]
    tile_l, seg, block_d = cfg.tile_l, cfg.seg_tiles, cfg.block_d
    n_tiles = triton.cdiv(L, tile_l)
    n_segs = triton.cdiv(n_tiles, seg)
    n_dblocks = triton.cdiv(dim, block_d)
    tiles_per_chunk = _chunking(n_segs, seg, batch * n_dblocks, _programs_wanted(u.device, cfg), cfg.chunk_tiles)
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    states = torch.empty(batch, n_segs, dstate, dim, **f32)
    flags, z_clamp = _rule_args(rule)
    gate_ = gate if gate is not None else u
    common = dict(COEFFS=rule.tl_coeffs, HISTORY=rule.history, HAS_D=D is not None, HAS_GATE=gate is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), SEG=seg, BLOCK_D=block_d,
                  TILE_L=tile_l, STATES=cfg.states_per_trip, **_launch_opts(cfg.num_warps, cfg.maxnreg), **flags)
    strides = (u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), gate_.stride(0), gate_.stride(1),
               out.stride(0), out.stride(1), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1),
               C.stride(2))
    D_ = D if D is not None else states
    bias_ = delta_bias if delta_bias is not None else states
    if n_chunks > 1:
        # each chunk from h = 0: its end state and prod Abar (the last chunk's are never needed)
        sum_H = torch.zeros(batch, n_chunks, dstate, dim, **f32)
        sum_P = torch.ones(batch, n_chunks, dstate, dim, **f32)
        _scan_fwd_kernel[(batch, n_dblocks, n_chunks - 1)](
            u, delta, A, B, C, D_, gate_, bias_, sum_H, sum_P, out, states,
            dim, L, dstate, dim // n_groups, n_tiles, n_segs, n_chunks, tiles_per_chunk, z_clamp, *strides,
            SUMMARY=True, **common)
        carry = sum_H  # overwritten in place with each chunk's start state
        _chunk_carry(sum_P, sum_H, carry, None, reverse=False)
        del sum_P
    else:
        carry = torch.zeros(batch, 1, dstate, dim, **f32)
    # carry[c] goes in as chunk c's start state and comes out as its end state
    _scan_fwd_kernel[(batch, n_dblocks, n_chunks)](
        u, delta, A, B, C, D_, gate_, bias_, carry, carry, out, states,
        dim, L, dstate, dim // n_groups, n_tiles, n_segs, n_chunks, tiles_per_chunk, z_clamp, *strides,
        SUMMARY=False, **common)
    return out, states, carry[:, -1].transpose(1, 2)


def _chunk_carry(P, R, carry, init, reverse):
    """P, R, carry: (batch, n_chunks, N, dim); init: (batch, N, dim)."""
    batch, n_chunks, dstate, dim = P.shape
    block = 256
    # rows: batch; columns: (state, channel)
    _chunk_carry_kernel[(triton.cdiv(batch * dstate * dim, block),)](
        P, R, carry, init if init is not None else P, batch, dstate * dim, n_chunks,
        HAS_INIT=init is not None, REVERSE=reverse, BLOCK=block)


def _selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, gate, delta_bias, delta_softplus, rule, cfg, states):
    batch, dim, L = u.shape
    dstate = A.shape[0]  # A arrives transposed, (N, dim)
    n_groups = B.shape[1]
    tile_l, seg, block_d = cfg.tile_l, cfg.seg_tiles, cfg.block_d_bwd
    n_tiles = triton.cdiv(L, tile_l)
    n_segs = states.shape[1]
    n_dblocks = triton.cdiv(dim, block_d)
    wanted = _programs_wanted(u.device, cfg)
    # channel splits first (each costs one (batch, G, N, L) fp32 partial for dB and dC), then chunks
    d_split = cfg.d_split or min(n_dblocks, 4, triton.cdiv(wanted, batch))
    dblocks_per_split = triton.cdiv(n_dblocks, d_split)
    d_split = triton.cdiv(n_dblocks, dblocks_per_split)
    tiles_per_chunk = _chunking(n_segs, seg, batch * d_split, wanted, cfg.bwd_chunk_tiles)
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    f32 = dict(device=u.device, dtype=torch.float32)
    flags, z_clamp = _rule_args(rule)
    gate_ = gate if gate is not None else u
    has_bias = delta_bias is not None
    bias_ = delta_bias if has_bias else states

    # g after each chunk: the sequential carry over the chunk summaries, seeded by d last_state
    init = dlast.float().transpose(1, 2).contiguous() if dlast is not None else None  # (batch, N, dim)
    if n_chunks > 1:
        sum_P = torch.ones(batch, n_chunks, dstate, dim, **f32)
        sum_R = torch.zeros(batch, n_chunks, dstate, dim, **f32)
        _scan_bwd_summary_kernel[(batch, triton.cdiv(dim, block_d), n_chunks)](
            delta, A, C, gate_, bias_, dout, sum_P, sum_R,
            dim, L, dstate, dim // n_groups, n_chunks, tiles_per_chunk, z_clamp,
            delta.stride(0), delta.stride(1), gate_.stride(0), gate_.stride(1), C.stride(0), C.stride(1),
            C.stride(2), dout.stride(0), dout.stride(1),
            COEFFS=rule.tl_coeffs, HAS_GATE=gate is not None, HAS_BIAS=has_bias, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=block_d, TILE_L=tile_l, STATES=cfg.states_per_trip, **_launch_opts(cfg.num_warps_bwd, cfg.maxnreg),
            **flags)
        carry = sum_R  # overwritten in place with g after each chunk
        _chunk_carry(sum_P, sum_R, carry, init, reverse=True)
        dA_part = sum_P.zero_()  # same shape, no longer needed
    else:
        carry = init[:, None].clone() if init is not None else torch.zeros(batch, 1, dstate, dim, **f32)
        dA_part = torch.zeros(batch, n_chunks, dstate, dim, **f32)

    # dense outputs whatever the inputs' strides (empty_like would copy a view's gaps)
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(delta.shape, device=u.device, dtype=delta.dtype)
    dgate = torch.empty(gate.shape, device=u.device, dtype=gate.dtype) if gate is not None else None
    dgate_ = dgate if dgate is not None else du
    scratch = torch.empty(batch * n_chunks * d_split, seg, dstate, block_d, **f32)
    dB_part = torch.zeros(d_split, batch, n_groups, dstate, L, **f32)
    dC_part = torch.zeros(d_split, batch, n_groups, dstate, L, **f32)
    dD_part = torch.empty(batch, n_chunks, dim, **f32)
    dbias_part = torch.empty(batch, n_chunks, dim, **f32)
    halo = max(rule.history, 1)
    need_halo = rule.history > 0 and n_chunks > 1
    du_halo = torch.zeros(batch, dim, n_chunks, halo, **f32) if need_halo else states
    dB_halo = torch.zeros(d_split, batch, n_groups, dstate, n_chunks, halo, **f32) if need_halo else states
    _scan_bwd_kernel[(batch, n_chunks, d_split)](
        u, delta, A, B, C, D if D is not None else states, gate_, bias_, dout,
        states, carry, scratch, du, ddelta, dgate_,
        dB_part, dC_part, dA_part, dD_part, dbias_part, du_halo, dB_halo,
        dim, L, dstate, n_groups, dim // n_groups, n_tiles, n_segs, n_chunks, tiles_per_chunk, n_dblocks,
        dblocks_per_split, z_clamp,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), gate_.stride(0), gate_.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        dout.stride(0), dout.stride(1), du.stride(0), du.stride(1), ddelta.stride(0), ddelta.stride(1),
        dgate_.stride(0), dgate_.stride(1),
        COEFFS=rule.tl_coeffs, COEFFS_GRAD=rule.tl_coeffs_grad, HISTORY=rule.history, HAS_D=D is not None,
        HAS_GATE=gate is not None, HAS_BIAS=has_bias, SOFTPLUS=bool(delta_softplus), SEG=seg, BLOCK_D=block_d,
        TILE_L=tile_l, HALO=halo, STATES=cfg.states_per_trip, STATES_BWD=cfg.states_per_trip_bwd,
        **_launch_opts(cfg.num_warps_bwd, cfg.maxnreg_bwd), **flags)

    dB = dB_part.sum(0)
    dC = dC_part.sum(0)
    if need_halo:
        # steps s_c - K .. s_c - 1 before each chunk start s_c > 0 get what that chunk's first tile sent back
        starts = torch.arange(1, n_chunks, device=u.device) * (tiles_per_chunk * tile_l)
        pos = (starts[:, None] - halo + torch.arange(halo, device=u.device)).reshape(-1)
        du[:, :, pos] = (du[:, :, pos].float() + du_halo[:, :, 1:].reshape(batch, dim, -1)).to(du.dtype)
        dB[..., pos] += dB_halo.sum(0)[..., 1:, :].reshape(batch, n_groups, dstate, -1)
    dA = dA_part.sum((0, 1)).t()
    dD = dD_part.sum((0, 1)) if D is not None else None
    dbias = dbias_part.sum((0, 1)) if has_bias else None
    return du, ddelta, dA, dB, dC, dD, dgate, dbias


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------
class SelectiveScanTritonFn(torch.autograd.Function):
    """Saves the inputs and the per-tile states; the backward recomputes everything else."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, rule, cfg):
        u, delta = _last_contiguous(u), _last_contiguous(delta)
        z = _last_contiguous(z) if z is not None else None
        squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
        Bg, Cg = _last_contiguous(_as_groups(B)), _last_contiguous(_as_groups(C))
        A = A.t().contiguous()  # (N, dim): the kernels read one state's channels at a time
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        cfg = _resolve_config(cfg, u, Bg.shape[1])
        out, states, last = _selective_scan_fwd(u, delta, A, Bg, Cg, D, z, delta_bias, delta_softplus, rule, cfg)
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, states)
        ctx.meta = (delta_softplus, rule, cfg, squeeze_B, squeeze_C, B.dtype, C.dtype)
        return (out, last) if return_last_state else out

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, Bg, Cg, D, z, delta_bias, states = ctx.saved_tensors
        delta_softplus, rule, cfg, squeeze_B, squeeze_C, B_dtype, C_dtype = ctx.meta
        du, ddelta, dA, dB, dC, dD, dz, dbias = _selective_scan_bwd(
            _last_contiguous(dout), dlast, u, delta, A, Bg, Cg, D, z, delta_bias, delta_softplus, rule, cfg, states)
        dB = (dB.squeeze(1) if squeeze_B else dB).to(B_dtype)
        dC = (dC.squeeze(1) if squeeze_C else dC).to(C_dtype)
        dD = dD.to(D.dtype) if dD is not None else None
        dbias = dbias.to(delta_bias.dtype) if dbias is not None else None
        return du, ddelta, dA.to(A.dtype), dB, dC, dD, dz, dbias, None, None, None, None


def _last_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------
def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, discretization='zoh', config=None):
    """The fused Triton path whatever the device (CPU needs TRITON_INTERPRET=1); `config`: a ScanConfig."""
    rule = get_discretizer(discretization)
    if rule.tl_coeffs is None or rule.tl_coeffs_grad is None:
        raise ValueError(f'rule {rule.name!r} has no triton coefficient functions')
    if A.is_complex():
        raise ValueError('complex A is not supported: the rules are defined for real z <= 0')
    return SelectiveScanTritonFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                       rule, config or ScanConfig())


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, discretization='zoh'):
    """Selective scan with a pluggable discretization rule (mamba-ssm's signature + `discretization`).

    h_t = Abar(z_t) h_{t-1} + delta_t sum_j w_j(z_t) B_t u_{t-j};  y_t = C_t h_t + D u_t  [* silu(z_t)]
    with z_t = delta_t A (after the rule's clamp), delta = softplus(delta + delta_bias) if delta_softplus.

    u, delta: (batch, dim, L) fp32/fp16/bf16; A: (dim, N) fp32, negative; B, C: (batch, N, L) or grouped
    (batch, G, N, L) (channel d reads group d // (dim // G)); D, delta_bias: (dim,) fp32; z: (batch, dim, L).
    Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N) fp32]. The state and all sums are
    fp32. `discretization`: a rule name ('zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4') or a
    Discretizer instance. The gradient of last_state flows back (mamba-ssm ignores it).

    CUDA tensors run the fused Triton kernels; CPU tensors run `selective_scan_parallel`. The env var
    VIM_DISC_SCAN=triton forces the Triton kernels (on CPU under TRITON_INTERPRET=1), =ref the sequential
    reference.

    Example::
        out = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                                discretization='foh')
    """
    mode = os.environ.get('VIM_DISC_SCAN', '')
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, discretization)
    if mode == 'ref':
        from .naive import selective_scan_ref
        return selective_scan_ref(*args)
    if mode == 'triton' or (mode == '' and u.is_cuda):
        return selective_scan_triton(*args)
    if mode not in ('', 'parallel'):
        raise ValueError(f"VIM_DISC_SCAN={mode!r}: expected 'triton', 'ref' or 'parallel'")
    from .parallel import selective_scan_parallel
    return selective_scan_parallel(*args)
