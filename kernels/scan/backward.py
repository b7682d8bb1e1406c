"""Backward kernel of the selective scan: one launch, one pass over time in reverse.

A program owns (batch b, BLOCK_D channels) and visits its tiles in the reverse of the forward's order. Per tile
the per-channel work is done once on [BLOCK_D, TILE_L] blocks (delta, u and its lags, dy = dout silu(z)); then,
per state, it restarts the forward from the state the forward saved before the tile (one scan) and runs the
adjoint dh_t = C_t dy_t + Abar_{t+1} dh_{t+1} as one reverse scan; the adjoint is carried between tiles in a
[BLOCK_D, BLOCK_N] register block (folded into the tile's last step, as the forward folds its state into the
first). Sums over states (du, d delta, y for dz) accumulate in registers across the state loop.

Abar_{t+1} is recomputed from delta_{t+1} (a shifted load, an exp) instead of shifting the scan's output across
lanes. The z-gradient needs dAbar/dz(z_t) h_{t-1}: for the e^z rules that is Abar_t h_{t-1} = h_t - x_t, so the
forward restart is a 2-tuple scan; other rules (bilinear, rk4, user rules) run a 4-tuple "lag" scan that
returns h_{t-1} beside h_t (dividing by Abar would fail where it reaches 0).

Sums over time (dA, dD, d delta_bias, constant dB/dC) stay in registers until the end; sums over channels
(time-varying dB/dC) are reduced over the program's BLOCK_D channels, then added with fp32 atomics, or, with
DETERMINISTIC, read-added-written into a partial that this program alone owns (summed by the caller).
A history term w_j v_{t-j} sends its input gradient j steps back: du's share is moved in registers once per
tile (``tl.gather``; what crosses into the next tile is carried), dB's is added at the shifted address.
"""
import triton
import triton.language as tl

from .common import (affine_combine, affine_lag_combine, channel_block, clamp_z, column, input_sum, lag,
                     lagged_rows, load_delta, trip_operands)


@triton.jit
def _accumulate(ptr, val, mask, DETERMINISTIC: tl.constexpr):
    """*ptr += val in fp32: relaxed atomics, or a read-add-write of rows this program alone writes."""
    if DETERMINISTIC:
        tl.debug_barrier()  # earlier accumulations may have reached these addresses from other threads
        tl.store(ptr, tl.load(ptr, mask=mask, other=0.0, volatile=True) + val, mask=mask)
        tl.debug_barrier()
    else:
        tl.atomic_add(ptr, val, mask=mask, sem='relaxed')


@triton.jit
def _shift_to_lag(x, lt, J: tl.constexpr, REVERSE: tl.constexpr, TILE_L: tl.constexpr):
    """Move x[:, s] of a [BLOCK_D, TILE_L] block to the step J earlier in scan order: (the part landing in
    this tile, the part landing in the next tile the backward visits, at the same local index)."""
    if REVERSE:
        inside = lt >= J
        src = (lt + (TILE_L - J)) % TILE_L
    else:
        inside = lt + J < TILE_L
        src = (lt + J) % TILE_L
    g = tl.gather(x, tl.broadcast_to(src[None, :], x.shape), axis=1)
    return tl.where(inside[None, :], g, 0.0), tl.where(inside[None, :], 0.0, g)


@triton.jit
def _input_grads(qd, wj, bj, uj, du_j, dBc, dB_n, sel, m, m_ok, L, n_ok,
                 J: tl.constexpr, VAR_B: tl.constexpr, REVERSE: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Gradients of the term w_J(z_t) B_{t-J} u_{t-J} of one state: du (at step t, moved J back per tile by
    the caller) and dB (added at step t - J)."""
    e = qd * wj
    du_j += e * bj
    dB_t = e * uj
    if VAR_B:
        s = lag(m, J, REVERSE)
        _accumulate(dB_n + s, tl.sum(dB_t, axis=0), n_ok & m_ok & (s >= 0) & (s < L), DETERMINISTIC)
    else:
        dBc += tl.where(sel, tl.sum(dB_t, axis=1)[:, None], 0.0)
    return du_j, dBc


@triton.jit
def _saved_state(state_prev, n, d_ok, has_prev, dstate):
    """State n before the tile, as the forward saved it ([BLOCK_D, 1]; zero before the first tile)."""
    return tl.load(state_prev + n, mask=d_ok & (n < dstate) & has_prev, other=0.0)[:, None]


@triton.jit
def _state_tile_grad(
    n, offs_n, lt, m, m_ok, valid, first, final, L, dstate, h_in, a, b0, b1, b2, b3, c,
    delta, delta_next, u0, u1, u2, u3, dy, y, dd, du0, du1, du2, du3,
    g_in, dA_all, dBc, dCc, dB_row, dC_row, z_clamp,
    COEFFS: tl.constexpr, COEFFS_GRAD: tl.constexpr, HISTORY: tl.constexpr, EXP_ABAR: tl.constexpr,
    HAS_CLAMP: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr, REVERSE: tl.constexpr,
    ADJOINT_REVERSE: tl.constexpr, DETERMINISTIC: tl.constexpr, TILE_L: tl.constexpr,
):
    """One state of one backward tile: restart h, run the adjoint from g_in (dh after the tile), add every
    gradient term. Returns the accumulators and dh at the tile's first step."""
    sel = (offs_n == n)[None, :]
    n_ok = n < dstate
    z_raw = delta * a
    abar, w0, w1, w2, w3, dabar, dw0, dw1, dw2, dw3 = COEFFS_GRAD(clamp_z(z_raw, z_clamp, HAS_CLAMP))
    xw = input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY)
    abar = tl.where(valid, abar, 1.0)
    x = tl.where(valid, delta * xw, 0.0)
    xf = tl.where(first, x + abar * h_in, x)
    # forward restart from the saved state: h_t and dAbar/dz h_{t-1}
    if EXP_ABAR:
        _, h = tl.associative_scan((abar, xf), axis=1, combine_fn=affine_combine, reverse=REVERSE)
        decay = h - x
    else:
        zero = tl.zeros_like(abar)
        _, _, h, h_prev = tl.associative_scan(
            (tl.where(first, zero, abar), tl.where(first, zero, zero + 1.0), xf, tl.where(first, zero + h_in, zero)),
            axis=1, combine_fn=affine_lag_combine, reverse=REVERSE)
        decay = dabar * h_prev
    y += c * h
    dC_t = dy * h
    if VAR_C:
        _accumulate(dC_row + n * L + m, tl.sum(dC_t, axis=0), n_ok & m_ok, DETERMINISTIC)
    else:
        dCc += tl.where(sel, tl.sum(tl.where(valid, dC_t, 0.0), axis=1)[:, None], 0.0)
    # adjoint: dh_t = c_t dy_t + Abar_{t+1} dh_{t+1}, Abar_{t+1} from the next step's delta (1 past the end)
    abar_next, _, _, _, _ = COEFFS(clamp_z(delta_next * a, z_clamp, HAS_CLAMP))
    m_next = lag(m, -1, REVERSE)
    abar_next = tl.where(((m_next >= 0) & (m_next < L))[None, :], abar_next, 1.0)
    cdy = c * dy
    cdy = tl.where(final, cdy + abar_next * g_in[:, None], cdy)
    _, dh = tl.associative_scan((abar_next, cdy), axis=1, combine_fn=affine_combine, reverse=ADJOINT_REVERSE)
    g_out = column(dh, lt, TILE_L - 1 if REVERSE else 0)
    dh = tl.where(valid, dh, 0.0)

    dzt = dh * (decay + delta * input_sum(dw0, dw1, dw2, dw3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY))
    if HAS_CLAMP:
        dzt = tl.where(z_raw >= z_clamp, dzt, 0.0)
    dA_all += tl.where(sel, tl.sum(dzt * delta, axis=1)[:, None], 0.0)
    dd += dh * xw + dzt * a
    # input gradients: dv_{t-j} += dh_t delta_t w_j(z_t); du sums over states, dB over channels
    qd = dh * delta
    dB_n = dB_row + n * L
    du0, dBc = _input_grads(qd, w0, b0, u0, du0, dBc, dB_n, sel, m, m_ok, L, n_ok, 0, VAR_B, REVERSE, DETERMINISTIC)
    if HISTORY >= 1:
        du1, dBc = _input_grads(qd, w1, b1, u1, du1, dBc, dB_n, sel, m, m_ok, L, n_ok, 1, VAR_B, REVERSE,
                                DETERMINISTIC)
    if HISTORY >= 2:
        du2, dBc = _input_grads(qd, w2, b2, u2, du2, dBc, dB_n, sel, m, m_ok, L, n_ok, 2, VAR_B, REVERSE,
                                DETERMINISTIC)
    if HISTORY >= 3:
        du3, dBc = _input_grads(qd, w3, b3, u3, du3, dBc, dB_n, sel, m, m_ok, L, n_ok, 3, VAR_B, REVERSE,
                                DETERMINISTIC)
    return y, dd, du0, du1, du2, du3, g_out, dA_all, dBc, dCc


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr, dlast_ptr,
    du_ptr, ddelta_ptr, dz_ptr,
    dB_ptr, dC_ptr,            # fp32: time-varying (parts, batch, G, N, L); constant (rows, dim, N)
    dA_ptr, dD_ptr, dbias_ptr,  # fp32: (rows, dim, N), (rows, dim), (rows, dim)
    dim, L, dstate, group_size, n_groups, n_tiles, n_dblocks, blocks_per_prog, batch, z_clamp, rev_from,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn,
    s_lb, s_ld, s_ln, s_dub, s_dud, s_ddb, s_ddd, s_dzb, s_dzd,
    COEFFS: tl.constexpr, COEFFS_GRAD: tl.constexpr, HISTORY: tl.constexpr, EXP_ABAR: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr, REVERSE: tl.constexpr,
    ADJOINT_REVERSE: tl.constexpr, BIDIR: tl.constexpr, HAS_DLAST: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILE_L: tl.constexpr, STATES: tl.constexpr,
):
    """Grid (programs over channel blocks, batch). Atomic mode: one channel block per program, every sum
    into row 0. DETERMINISTIC: a program walks blocks_per_prog consecutive blocks and owns partial row
    `pid_p` of the time-varying dB/dC and row `pid_b` of the parameter sums. BIDIR: blocks from channel
    `rev_from` on run the reverse direction (their forward ran in reverse) and read the gate at channel - rev_from."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    if DETERMINISTIC:
        prow = pid_b
        part = pid_p
    else:
        prow = 0
        part = 0
    i = 0
    n_blocks = tl.minimum(blocks_per_prog, n_dblocks - pid_p * blocks_per_prog)  # the last column may be short
    while i < n_blocks:  # one block per program in atomic mode
        dblock = pid_p * blocks_per_prog + i
        i += 1
        if BIDIR:
            if dblock * BLOCK_D >= rev_from:
                _scan_bwd_block(
                    pid_b, dblock, prow, part, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                    state_ptr, dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dim, L,
                    dstate, group_size, n_groups, n_tiles, batch, z_clamp, rev_from, s_ub, s_ud, s_db, s_dd, s_zb, s_zd,
                    s_gb, s_gd, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn, s_lb, s_ld, s_ln, s_dub, s_dud, s_ddb,
                    s_ddd, s_dzb, s_dzd, COEFFS, COEFFS_GRAD, HISTORY, EXP_ABAR, HAS_CLAMP, HAS_D, HAS_Z, HAS_BIAS,
                    SOFTPLUS, VAR_B, VAR_C, True, False, HAS_DLAST, DETERMINISTIC, BLOCK_D, BLOCK_N, TILE_L, STATES)
            else:
                _scan_bwd_block(
                    pid_b, dblock, prow, part, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                    state_ptr, dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dim, L,
                    dstate, group_size, n_groups, n_tiles, batch, z_clamp, 0, s_ub, s_ud, s_db, s_dd, s_zb, s_zd,
                    s_gb, s_gd, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn, s_lb, s_ld, s_ln, s_dub, s_dud, s_ddb,
                    s_ddd, s_dzb, s_dzd, COEFFS, COEFFS_GRAD, HISTORY, EXP_ABAR, HAS_CLAMP, HAS_D, HAS_Z, HAS_BIAS,
                    SOFTPLUS, VAR_B, VAR_C, False, True, HAS_DLAST, DETERMINISTIC, BLOCK_D, BLOCK_N, TILE_L, STATES)
        else:
            _scan_bwd_block(
                pid_b, dblock, prow, part, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr,
                state_ptr, dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dim, L,
                dstate, group_size, n_groups, n_tiles, batch, z_clamp, 0, s_ub, s_ud, s_db, s_dd, s_zb, s_zd,
                s_gb, s_gd, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn, s_lb, s_ld, s_ln, s_dub, s_dud, s_ddb,
                s_ddd, s_dzb, s_dzd, COEFFS, COEFFS_GRAD, HISTORY, EXP_ABAR, HAS_CLAMP, HAS_D, HAS_Z, HAS_BIAS,
                SOFTPLUS, VAR_B, VAR_C, REVERSE, ADJOINT_REVERSE, HAS_DLAST, DETERMINISTIC, BLOCK_D, BLOCK_N, TILE_L,
                STATES)


@triton.jit
def _scan_bwd_block(
    pid_b, dblock, prow, part, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, state_ptr,
    dlast_ptr, du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    dim, L, dstate, group_size, n_groups, n_tiles, batch, z_clamp, z_shift,
    s_ub, s_ud, s_db, s_dd, s_zb, s_zd, s_gb, s_gd, s_Ad, s_An, s_B0, s_B1, s_Bn, s_C0, s_C1, s_Cn,
    s_lb, s_ld, s_ln, s_dub, s_dud, s_ddb, s_ddd, s_dzb, s_dzd,
    COEFFS: tl.constexpr, COEFFS_GRAD: tl.constexpr, HISTORY: tl.constexpr, EXP_ABAR: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr, REVERSE: tl.constexpr,
    ADJOINT_REVERSE: tl.constexpr, HAS_DLAST: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TILE_L: tl.constexpr, STATES: tl.constexpr,
):
    """One channel block of one batch row, in one direction; its gate rows are z's channels - z_shift."""
    offs_d, d_ok, g_idx, u_row, delta_row, B_rows, C_rows, bias, Dv = channel_block(
        pid_b, dblock, dim, group_size, u_ptr, s_ub, s_ud, delta_ptr, s_db, s_dd, B_ptr, s_B0, s_B1, C_ptr, s_C0,
        s_C1, bias_ptr, D_ptr, VAR_B, VAR_C, HAS_BIAS, HAS_D, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    lt = tl.arange(0, TILE_L)
    dn_ok = d_ok[:, None] & (offs_n < dstate)[None, :]
    # time-varying dB/dC accumulators: (parts, batch, G, N, L) fp32
    dB_row = dB_ptr + ((part * batch + pid_b) * n_groups + g_idx) * dstate * L
    dC_row = dC_ptr + ((part * batch + pid_b) * n_groups + g_idx) * dstate * L
    state_row = state_ptr + pid_b * n_tiles * dim * dstate + offs_d * dstate
    g_all = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # dh after the tile (scan order), per state
    if HAS_DLAST:
        g_all = tl.load(dlast_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_n[None, :] * s_ln, mask=dn_ok,
                        other=0.0).to(tl.float32)
    first = (lt == (TILE_L - 1 if REVERSE else 0))[None, :]  # the tile's first step in scan order
    final = (lt == (0 if REVERSE else TILE_L - 1))[None, :]  # and its last
    dA_all = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dBc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dCc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    du_next = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)  # du sent back into the next tile visited

    k = n_tiles - 1
    while k >= 0:
        tile = n_tiles - 1 - k if REVERSE else k
        m = tile * TILE_L + lt
        m_ok = m < L
        valid = m_ok[None, :]
        td_ok = d_ok[:, None] & valid
        has_prev = k > 0
        state_prev = state_row + (k - 1) * dim * dstate
        delta, dsp = load_delta(delta_row, bias, m, L, d_ok, HAS_BIAS, SOFTPLUS)
        delta_next, _ = load_delta(delta_row, bias, lag(m, -1, REVERSE), L, d_ok, HAS_BIAS, SOFTPLUS)
        u0, u1, u2, u3 = lagged_rows(u_row, m, L, d_ok, HISTORY, REVERSE)
        dout = tl.load(dout_ptr + pid_b * s_gb + offs_d[:, None] * s_gd + m[None, :], mask=td_ok,
                       other=0.0).to(tl.float32)
        if HAS_Z:
            zg = tl.load(z_ptr + pid_b * s_zb + (offs_d - z_shift)[:, None] * s_zd + m[None, :], mask=td_ok,
                         other=0.0).to(tl.float32)
            dy = dout * (zg * tl.sigmoid(zg))
        else:
            dy = dout
        y = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        dd = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        du0 = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        du1, du2, du3 = du0, du0, du0
        # STATES (1 or 2) states per trip, their adjoint carries picked before and written after (see forward)
        n = 0
        while n < dstate:
            sel, g_in, a, b0, b1, b2, b3, c, sel2, g2_in, a2, b20, b21, b22, b23, c2 = trip_operands(
                n, g_all, offs_n, offs_d, d_ok, m, L, A_ptr, s_Ad, s_An, B_rows, s_B0, s_Bn, C_rows, s_C0, s_Cn,
                dstate, HISTORY, VAR_B, VAR_C, REVERSE, STATES)
            y, dd, du0, du1, du2, du3, g_out, dA_all, dBc, dCc = _state_tile_grad(
                n, offs_n, lt, m, m_ok, valid, first, final, L, dstate, _saved_state(state_prev, n, d_ok, has_prev,
                                                                                     dstate),
                a, b0, b1, b2, b3, c, delta, delta_next, u0, u1, u2, u3, dy, y, dd, du0, du1, du2, du3,
                g_in, dA_all, dBc, dCc, dB_row, dC_row, z_clamp, COEFFS, COEFFS_GRAD, HISTORY, EXP_ABAR,
                HAS_CLAMP, VAR_B, VAR_C, REVERSE, ADJOINT_REVERSE, DETERMINISTIC, TILE_L)
            if STATES == 2:
                y, dd, du0, du1, du2, du3, g2_out, dA_all, dBc, dCc = _state_tile_grad(
                    n + 1, offs_n, lt, m, m_ok, valid, first, final, L, dstate,
                    _saved_state(state_prev, n + 1, d_ok, has_prev, dstate), a2, b20, b21, b22, b23, c2,
                    delta, delta_next, u0, u1, u2, u3, dy, y, dd, du0, du1, du2, du3,
                    g2_in, dA_all, dBc, dCc, dB_row, dC_row, z_clamp, COEFFS, COEFFS_GRAD, HISTORY, EXP_ABAR,
                    HAS_CLAMP, VAR_B, VAR_C, REVERSE, ADJOINT_REVERSE, DETERMINISTIC, TILE_L)
            g_all = tl.where(sel, g_out[:, None], g_all)
            if STATES == 2:
                g_all = tl.where(sel2, g2_out[:, None], g_all)
            n += STATES
        # per-channel outputs of the tile (the gate is read again rather than held live in registers across
        # the state loop; the second read hits cache)
        if HAS_Z:
            zg = tl.load(z_ptr + pid_b * s_zb + (offs_d - z_shift)[:, None] * s_zd + m[None, :], mask=td_ok,
                         other=0.0).to(tl.float32)
            sig = tl.sigmoid(zg)
            y += Dv[:, None] * u0
            tl.store(dz_ptr + pid_b * s_dzb + offs_d[:, None] * s_dzd + m[None, :],
                     dout * y * sig * (1.0 + zg * (1.0 - sig)), mask=td_ok)
        du = du0 + Dv[:, None] * dy + du_next
        du_next = tl.zeros([BLOCK_D, TILE_L], dtype=tl.float32)
        if HISTORY >= 1:
            own, spill = _shift_to_lag(du1, lt, 1, REVERSE, TILE_L)
            du += own
            du_next += spill
        if HISTORY >= 2:
            own, spill = _shift_to_lag(du2, lt, 2, REVERSE, TILE_L)
            du += own
            du_next += spill
        if HISTORY >= 3:
            own, spill = _shift_to_lag(du3, lt, 3, REVERSE, TILE_L)
            du += own
            du_next += spill
        tl.store(du_ptr + pid_b * s_dub + offs_d[:, None] * s_dud + m[None, :], du, mask=td_ok)
        dd = dd * dsp
        tl.store(ddelta_ptr + pid_b * s_ddb + offs_d[:, None] * s_ddd + m[None, :], dd, mask=td_ok)
        dbias_acc += tl.sum(dd, axis=1)
        dD_acc += tl.sum(dy * u0, axis=1)
        k -= 1

    # sums over time; over batch through atomics or the caller's sum of per-batch rows (prow)
    par = prow * dim * dstate + offs_d[:, None] * dstate + offs_n[None, :]
    _accumulate(dA_ptr + par, dA_all, dn_ok, DETERMINISTIC)
    if not VAR_B:
        _accumulate(dB_ptr + par, dBc, dn_ok, DETERMINISTIC)
    if not VAR_C:
        _accumulate(dC_ptr + par, dCc, dn_ok, DETERMINISTIC)
    if HAS_D:
        _accumulate(dD_ptr + prow * dim + offs_d, dD_acc, d_ok, DETERMINISTIC)
    if HAS_BIAS:
        _accumulate(dbias_ptr + prow * dim + offs_d, dbias_acc, d_ok, DETERMINISTIC)
