"""Forward kernel of the selective scan: one launch, one pass over time.

A program owns (batch b, BLOCK_D channels) and walks its rows of time in tiles of TILE_L steps. Per tile the
per-channel work (delta = softplus(dt + bias), u and its lags, the gate) is done once on [BLOCK_D, TILE_L]
blocks; then a loop over the N states builds each state's (Abar, x) block and one ``tl.associative_scan`` over
time gives its h_t, and y += C h is a register FMA. A state's carry between tiles (h at the tile's end) stays
in registers, in a [BLOCK_D, BLOCK_N] block: it is folded into the tile's first step (x_0 += Abar_0 h), so the
scan needs no fix-up.

The states after each tile go to a small fp32 buffer (batch, n_tiles, dim, N): the backward restarts each tile
from it, and its last slot is ``last_state``. Nothing else is written besides ``out``. When the caller will need
gradients the kernel also zeroes the backward's fp32 accumulators (so the backward needs no memset launch).
"""
import triton
import triton.language as tl

from .common import (affine_combine, channel_block, clamp_z, column, input_sum, lagged_rows, load_delta,
                     trip_operands)

ZERO_BLOCK = tl.constexpr(1024)


@triton.jit
def _zero_slice(ws_ptr, ws_numel, pid, n_programs):
    """Program pid zeroes its share of the fp32 workspace."""
    per = tl.cdiv(ws_numel, n_programs)
    offs = tl.arange(0, ZERO_BLOCK)
    i = 0
    while i < per:
        idx = pid * per + i + offs
        tl.store(ws_ptr + idx, tl.zeros([ZERO_BLOCK], dtype=tl.float32), mask=(i + offs < per) & (idx < ws_numel))
        i += ZERO_BLOCK


@triton.jit
def _state_tile(h_in, a, b0, b1, b2, b3, delta, u0, u1, u2, u3, valid, first, lt, z_clamp, COEFFS: tl.constexpr,
                HISTORY: tl.constexpr, HAS_CLAMP: tl.constexpr, REVERSE: tl.constexpr, TILE_L: tl.constexpr):
    """h_t of one state over one tile from its carried state h_in; returns (h block, h at the tile's end)."""
    abar, w0, w1, w2, w3 = COEFFS(clamp_z(delta * a, z_clamp, HAS_CLAMP))
    xw = input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY)
    # steps past L are identity maps, so the carry passes through them unchanged
    abar = tl.where(valid, abar, 1.0)
    x = tl.where(valid, delta * xw, 0.0)
    x = tl.where(first, x + abar * h_in[:, None], x)
    _, h = tl.associative_scan((abar, x), axis=1, combine_fn=affine_combine, reverse=REVERSE)
    return h, column(h, lt, 0 if REVERSE else TILE_L - 1)


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, state_ptr,       # out (batch, dim, L); state (batch, n_tiles, dim, N) fp32: h after each tile
    ws_ptr, ws_numel,         # ZERO_WS: the backward's fp32 accumulators, zeroed here
    dim, L, dstate, group_size, n_tiles, z_clamp, rev_from,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob, s_od, s_Ad, s_An,
    s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn,   # variable: (batch, group, N) strides; constant: (dim, -, N)
    COEFFS: tl.constexpr, HISTORY: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr,
    VAR_C: tl.constexpr, REVERSE: tl.constexpr, BIDIR: tl.constexpr, STORE_STATE: tl.constexpr,
    ZERO_WS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILE_L: tl.constexpr,
    STATES: tl.constexpr,
):
    """Grid (channel blocks, batch). BIDIR: channels from `rev_from` on scan in reverse (a second direction
    in the same launch; blocks never straddle it) and read the gate at channel - rev_from."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    if ZERO_WS:
        _zero_slice(ws_ptr, ws_numel, pid_b * tl.num_programs(0) + pid_d, tl.num_programs(0) * tl.num_programs(1))
    if BIDIR:
        if pid_d * BLOCK_D >= rev_from:
            _scan_fwd_rows(
                pid_d, pid_b, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr,
                dim, L, dstate, group_size, n_tiles, z_clamp, rev_from, s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob,
                s_od, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn, COEFFS, HISTORY, HAS_CLAMP, HAS_D, HAS_Z,
                HAS_BIAS, SOFTPLUS, VAR_B, VAR_C, True, STORE_STATE, BLOCK_D, BLOCK_N, TILE_L, STATES)
        else:
            _scan_fwd_rows(
                pid_d, pid_b, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr,
                dim, L, dstate, group_size, n_tiles, z_clamp, 0, s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob,
                s_od, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn, COEFFS, HISTORY, HAS_CLAMP, HAS_D, HAS_Z,
                HAS_BIAS, SOFTPLUS, VAR_B, VAR_C, False, STORE_STATE, BLOCK_D, BLOCK_N, TILE_L, STATES)
    else:
        _scan_fwd_rows(
            pid_d, pid_b, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr,
            dim, L, dstate, group_size, n_tiles, z_clamp, 0, s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob,
            s_od, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn, COEFFS, HISTORY, HAS_CLAMP, HAS_D, HAS_Z,
            HAS_BIAS, SOFTPLUS, VAR_B, VAR_C, REVERSE, STORE_STATE, BLOCK_D, BLOCK_N, TILE_L, STATES)


@triton.jit
def _scan_fwd_rows(
    pid_d, pid_b, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, state_ptr,
    dim, L, dstate, group_size, n_tiles, z_clamp, z_shift,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_ob, s_od, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn,
    COEFFS: tl.constexpr, HISTORY: tl.constexpr, HAS_CLAMP: tl.constexpr, HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr,
    VAR_C: tl.constexpr, REVERSE: tl.constexpr, STORE_STATE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILE_L: tl.constexpr, STATES: tl.constexpr,
):
    """Channel block pid_d of batch row pid_b, in one direction; its gate rows are z's channels - z_shift."""
    offs_d, d_ok, g_idx, u_row, delta_row, B_rows, C_rows, bias, Dv = channel_block(
        pid_b, pid_d, dim, group_size, u_ptr, s_ub, s_ud, delta_ptr, s_db, s_dd, B_ptr, s_B0, s_B1, C_ptr, s_C0, s_C1,
        bias_ptr, D_ptr, VAR_B, VAR_C, HAS_BIAS, HAS_D, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    lt = tl.arange(0, TILE_L)
    dn_ok = d_ok[:, None] & (offs_n < dstate)[None, :]
    state_row = state_ptr + pid_b * n_tiles * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    first = (lt == (TILE_L - 1 if REVERSE else 0))[None, :]  # where the carried state enters a tile

    h_all = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    k = 0
    while k < n_tiles:  # while, not range(): the interpreter cannot take a runtime bound (numpy 2.4)
        tile = n_tiles - 1 - k if REVERSE else k
        m = tile * TILE_L + lt
        m_ok = m < L
        valid = m_ok[None, :]
        td_ok = d_ok[:, None] & valid
        delta, _ = load_delta(delta_row, bias, m, L, d_ok, HAS_BIAS, SOFTPLUS)
        u0, u1, u2, u3 = lagged_rows(u_row, m, L, d_ok, HISTORY, REVERSE)
        y = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        # STATES (1 or 2) states per trip: their carries are picked before and written after both scans, so
        # the two chains can overlap (operands are loaded where used: prefetching them a trip ahead measured
        # slower on the H200, docs/performance.md)
        n = 0
        while n < dstate:
            sel, h_in, a, b0, b1, b2, b3, c, sel2, h2_in, a2, b20, b21, b22, b23, c2 = trip_operands(
                n, h_all, offs_n, offs_d, d_ok, m, L, A_ptr, s_Ad, s_An, B_rows, s_B0, s_Bn, C_rows, s_C0, s_Cn,
                dstate, HISTORY, VAR_B, VAR_C, REVERSE, STATES)
            h, h_end = _state_tile(h_in, a, b0, b1, b2, b3, delta, u0, u1, u2, u3, valid, first, lt,
                                   z_clamp, COEFFS, HISTORY, HAS_CLAMP, REVERSE, TILE_L)
            y += c * h
            h_all = tl.where(sel, h_end[:, None], h_all)
            if STATES == 2:
                h2, h2_end = _state_tile(h2_in, a2, b20, b21, b22, b23, delta, u0, u1, u2, u3, valid, first, lt,
                                         z_clamp, COEFFS, HISTORY, HAS_CLAMP, REVERSE, TILE_L)
                y += c2 * h2
                h_all = tl.where(sel2, h2_end[:, None], h_all)
            n += STATES
        if STORE_STATE:
            tl.store(state_row + k * dim * dstate, h_all, mask=dn_ok)
        if HAS_D:
            y += Dv[:, None] * u0
        if HAS_Z:
            zg = tl.load(z_ptr + pid_b * s_zb + (offs_d - z_shift)[:, None] * s_zd + m[None, :], mask=td_ok,
                         other=0.0).to(tl.float32)
            y = y * (zg * tl.sigmoid(zg))
        tl.store(out_ptr + pid_b * s_ob + offs_d[:, None] * s_od + m[None, :], y, mask=td_ok)
        k += 1
