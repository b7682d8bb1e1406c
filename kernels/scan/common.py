"""Triton helpers shared by the forward and backward scan kernels.

Tiles are [BLOCK_D, TILE_L] blocks (channels, time): per-channel work (softplus, gate, D) is done once per
tile, then a loop over the N states scans one state's block at a time; the states' carries live in a small
[BLOCK_D, BLOCK_N] register block. Memory is always read in ascending order (16-byte loads); a scan that runs
from the end (``REVERSE``) flips the direction of the in-register scans, the order of the tiles and the sign
of every history lag instead.
"""
import triton
import triton.language as tl


@triton.jit
def affine_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def affine_lag_combine(p1, q1, r1, s1, p2, q2, r2, s2):
    # An element maps the carried state h to (new state, the state one step earlier) = (p h + r, q h + s);
    # one step is (Abar, 1, x, 0). Composition keeps both, so a scan returns h_t and h_{t-1} together.
    return p1 * p2, q2 * p1, p2 * r1 + r2, q2 * r1 + s2


@triton.jit
def softplus(x):
    # log1p(e^x) with Goldberg's log1p trick (libdevice.log1p is missing in the interpreter): exact for
    # tiny e^x, where log(1 + e^x) would round to 0 and lose the step entirely.
    e = tl.exp(tl.minimum(x, 20.0))
    s = 1.0 + e
    lp = tl.where(s == 1.0, e, tl.log(s) * (e / (s - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def lag(m, J: tl.constexpr, REVERSE: tl.constexpr):
    """Memory index of the step J steps earlier in scan order."""
    if REVERSE:
        return m + J
    else:
        return m - J


@triton.jit
def load_delta(delta_row, bias, m, L, d_ok, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(delta_t, d delta_t / d dt) on a [BLOCK_D, TILE_L] block; steps outside [0, L) read dt = 0."""
    dt = load_channels(delta_row, m, L, d_ok, 0, False)
    if HAS_BIAS:
        dt += bias[:, None]
    if SOFTPLUS:
        return softplus(dt), tl.sigmoid(dt)
    else:
        return dt, 1.0 + 0.0 * dt


@triton.jit
def load_channels(row, m, L, d_ok, J: tl.constexpr, REVERSE: tl.constexpr):
    """x_{t-J} of a per-channel (batch, dim, L) tensor as a [BLOCK_D, TILE_L] block (row: [BLOCK_D, 1]
    channel pointers), 0 outside [0, L)."""
    s = lag(m, J, REVERSE)
    return tl.load(row + s[None, :], mask=d_ok[:, None] & ((s >= 0) & (s < L))[None, :], other=0.0).to(tl.float32)


@triton.jit
def load_state_row(ptr, m, L, J: tl.constexpr, REVERSE: tl.constexpr, VARIABLE: tl.constexpr, n_ok, chan_ok):
    """B_{t-J}[n] (or C) of one state, broadcastable against [BLOCK_D, TILE_L]: a [1, TILE_L] row when it
    varies in time (ptr: the state's row), a [BLOCK_D, 1] column when it is constant (ptr: [BLOCK_D] channel
    pointers into the (dim, N) matrix)."""
    if VARIABLE:
        s = lag(m, J, REVERSE)
        return tl.load(ptr + s, mask=n_ok & (s >= 0) & (s < L), other=0.0).to(tl.float32)[None, :]
    else:
        return tl.load(ptr, mask=chan_ok & n_ok, other=0.0).to(tl.float32)[:, None]


@triton.jit
def lagged_rows(u_row, m, L, d_ok, HISTORY: tl.constexpr, REVERSE: tl.constexpr):
    """u_{t-j} for j = 0..3 (unused lags repeat j = 0)."""
    u0 = load_channels(u_row, m, L, d_ok, 0, REVERSE)
    u1, u2, u3 = u0, u0, u0
    if HISTORY >= 1:
        u1 = load_channels(u_row, m, L, d_ok, 1, REVERSE)
    if HISTORY >= 2:
        u2 = load_channels(u_row, m, L, d_ok, 2, REVERSE)
    if HISTORY >= 3:
        u3 = load_channels(u_row, m, L, d_ok, 3, REVERSE)
    return u0, u1, u2, u3


@triton.jit
def lagged_state_rows(ptr, m, L, HISTORY: tl.constexpr, REVERSE: tl.constexpr, VARIABLE: tl.constexpr, n_ok,
                      chan_ok):
    """B_{t-j}[n] for j = 0..3 (a constant B has no lag)."""
    b0 = load_state_row(ptr, m, L, 0, REVERSE, VARIABLE, n_ok, chan_ok)
    b1, b2, b3 = b0, b0, b0
    if VARIABLE:
        if HISTORY >= 1:
            b1 = load_state_row(ptr, m, L, 1, REVERSE, VARIABLE, n_ok, chan_ok)
        if HISTORY >= 2:
            b2 = load_state_row(ptr, m, L, 2, REVERSE, VARIABLE, n_ok, chan_ok)
        if HISTORY >= 3:
            b3 = load_state_row(ptr, m, L, 3, REVERSE, VARIABLE, n_ok, chan_ok)
    return b0, b1, b2, b3


@triton.jit
def input_sum(w0, w1, w2, w3, b0, b1, b2, b3, u0, u1, u2, u3, HISTORY: tl.constexpr):
    """sum_j w_j B_{t-j} u_{t-j} of one state on a [BLOCK_D, TILE_L] block."""
    xw = w0 * (b0 * u0)
    if HISTORY >= 1:
        xw += w1 * (b1 * u1)
    if HISTORY >= 2:
        xw += w2 * (b2 * u2)
    if HISTORY >= 3:
        xw += w3 * (b3 * u3)
    return xw


@triton.jit
def channel_block(pid_b, dblock, dim, group_size, u_ptr, s_ub, s_ud, delta_ptr, s_db, s_dd, B_ptr, s_B0, s_B1,
                  C_ptr, s_C0, s_C1, bias_ptr, D_ptr, VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Channel block `dblock` of batch row pid_b: its channels and their mask, [BLOCK_D, 1] row pointers into
    u and delta, the rows of its group of B/C (a block never straddles two groups: the launcher's choice),
    delta_bias and D (zero when absent)."""
    offs_d = dblock * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < dim
    g_idx = (dblock * BLOCK_D) // group_size
    if VAR_B:
        B_ptr += pid_b * s_B0 + g_idx * s_B1
    if VAR_C:
        C_ptr += pid_b * s_C0 + g_idx * s_C1
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    Dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return (offs_d, d_ok, g_idx, u_ptr + pid_b * s_ub + offs_d[:, None] * s_ud,
            delta_ptr + pid_b * s_db + offs_d[:, None] * s_dd, B_ptr, C_ptr, bias, Dv)


@triton.jit
def clamp_z(z, z_clamp, HAS_CLAMP: tl.constexpr):
    """The rule's clamp z' = max(z, z_clamp), when it has one."""
    if HAS_CLAMP:
        z = tl.maximum(z, z_clamp)
    return z


@triton.jit
def state_rows(n, offs_d, d_ok, m, L, A_ptr, s_Ad, s_An, B_ptr, s_B0, s_Bn, C_ptr, s_C0, s_Cn, dstate,
                HISTORY: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr, REVERSE: tl.constexpr):
    """What state n reads in a tile: a = A[:, n] ([BLOCK_D, 1]), B_{t-j}[n] and C_t[n] (zero past dstate).
    Issued one trip ahead of their use (see the state loop)."""
    n_ok = n < dstate
    a = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=d_ok & n_ok, other=0.0).to(tl.float32)[:, None]
    if VAR_B:
        B_n = B_ptr + n * s_Bn
    else:
        B_n = B_ptr + offs_d * s_B0 + n * s_Bn
    if VAR_C:
        C_n = C_ptr + n * s_Cn
    else:
        C_n = C_ptr + offs_d * s_C0 + n * s_Cn
    b0, b1, b2, b3 = lagged_state_rows(B_n, m, L, HISTORY, REVERSE, VAR_B, n_ok, d_ok)
    return a, b0, b1, b2, b3, load_state_row(C_n, m, L, 0, REVERSE, VAR_C, n_ok, d_ok)


@triton.jit
def trip_operands(n, carries, offs_n, offs_d, d_ok, m, L, A_ptr, s_Ad, s_An, B_ptr, s_B0, s_Bn, C_ptr, s_C0, s_Cn,
                  dstate, HISTORY: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr, REVERSE: tl.constexpr,
                  STATES: tl.constexpr):
    """One trip of a state loop (states n and, with STATES == 2, n + 1): each state's column selector, carry
    (picked before either scan, so the two chains can overlap) and operands (see state_rows). The second
    state's values repeat the first's when STATES == 1."""
    sel = (offs_n == n)[None, :]
    a, b0, b1, b2, b3, c = state_rows(n, offs_d, d_ok, m, L, A_ptr, s_Ad, s_An, B_ptr, s_B0, s_Bn, C_ptr, s_C0, s_Cn,
                                      dstate, HISTORY, VAR_B, VAR_C, REVERSE)
    carry = pick(carries, sel)
    sel2, carry2, a2, b20, b21, b22, b23, c2 = sel, carry, a, b0, b1, b2, b3, c
    if STATES == 2:
        sel2 = (offs_n == n + 1)[None, :]
        carry2 = pick(carries, sel2)
        a2, b20, b21, b22, b23, c2 = state_rows(n + 1, offs_d, d_ok, m, L, A_ptr, s_Ad, s_An, B_ptr, s_B0, s_Bn,
                                                C_ptr, s_C0, s_Cn, dstate, HISTORY, VAR_B, VAR_C, REVERSE)
    return sel, carry, a, b0, b1, b2, b3, c, sel2, carry2, a2, b20, b21, b22, b23, c2


@triton.jit
def pick(x, sel):
    """x[:, n] of a [BLOCK_D, BLOCK_N] block (sel: offs_n == n, [1, BLOCK_N])."""
    return tl.sum(tl.where(sel, x, 0.0), axis=1)


@triton.jit
def column(x, lt, k):
    """x[:, k] of a [BLOCK_D, TILE_L] block (a masked sum: exact)."""
    return tl.sum(tl.where((lt == k)[None, :], x, 0.0), axis=1)
