"""Launchers, autograd and the public selective scan: mamba-ssm's ``selective_scan_fn`` plus the rule.

Shapes accepted (mamba-ssm's, every combination of its test grid): u, delta, z (batch, dim, L); A (dim, N)
real; B, C time-varying (batch, N, L), grouped (batch, G, N, L) with G dividing dim, or constant (dim, N);
D, delta_bias (dim,). Anything else is a ValueError naming the argument, before any launch.
"""
import math
import os
from dataclasses import dataclass

import torch
import triton

from ..discretization import get_discretizer
from .backward import scan_bwd_kernel
from .forward import scan_fwd_kernel

# the deterministic backward keeps one fp32 dB/dC partial per program column; this caps their memory
DETERMINISTIC_PARTIAL_BYTES = 64 << 20


@dataclass(frozen=True)
class ScanConfig:
    """Launch shape of the fused kernels; 0 picks from the problem's shape (no autotuner: the backward
    accumulates in place, so a tuning rerun would double-count).

    tile_l: time steps per tile, a power of two >= 4, shared by both kernels (the backward restarts each
    tile from the state the forward saved before it); block_d / block_d_bwd: channels per program (a power
    of two; capped so a block stays in one group of B/C); num_warps / num_warps_bwd: warps per program;
    states / states_bwd: states per trip of the state loop (1 or 2: two independent scans to overlap);
    d_split: program columns per batch row of the deterministic backward (each owns one dB/dC partial).
    A program's tile is [block_d, tile_l] fp32 values per operand.
    """
    tile_l: int = 0
    block_d: int = 0
    num_warps: int = 0
    states: int = 0
    block_d_bwd: int = 0
    num_warps_bwd: int = 0
    states_bwd: int = 0
    d_split: int = 0


@dataclass(frozen=True)
class _Launch:
    block_d: int
    block_n: int
    tile_l: int
    num_warps: int
    states: int


def _pow2_at_most(n):
    return 1 << (max(1, int(n)).bit_length() - 1)


def _tile_l(cfg, L):
    if cfg.tile_l and (cfg.tile_l < 4 or cfg.tile_l & (cfg.tile_l - 1)):
        raise ValueError(f'tile_l must be a power of two >= 4, got {cfg.tile_l}')
    # >= 4: a history lag (<= 3 steps) reaches at most into the neighbouring tile
    # measured on an H200 (docs/performance.md): long rows want few, long tiles (each tile is a step of the
    # program's serial chain); short rows one tile
    return cfg.tile_l or (512 if L >= 2048 else max(4, min(256, triton.next_power_of_2(L))))


def _launch(block_d, tile_l, num_warps, states, dim, group_size, N, backward):
    """Resolve one kernel's launch shape. Defaults (H200 sweeps, docs/performance.md): one channel per
    program; forward a warp per 256 steps of the tile (8 fp32 values of an operand per thread), two states
    per trip from 512-step tiles on; backward one warp up to 256 steps, a warp per 128 beyond, one state."""
    block_n = triton.next_power_of_2(N)
    if block_d and block_d & (block_d - 1):
        raise ValueError(f'block_d must be a power of two, got {block_d}')
    if states not in (0, 1, 2):
        raise ValueError(f'states per trip must be 1 or 2, got {states}')
    block_d = block_d or 1
    # a block never straddles two groups of B/C, nor runs far past dim
    block_d = min(block_d, group_size & -group_size, triton.next_power_of_2(dim))
    if backward:
        num_warps = num_warps or (1 if block_d * tile_l <= 256 else min(16, _pow2_at_most(block_d * tile_l // 128)))
        states = states or 1
    else:
        num_warps = num_warps or min(16, max(1, _pow2_at_most(block_d * tile_l // 256)))
        states = states or (2 if tile_l >= 512 else 1)
    return _Launch(block_d, block_n, tile_l, num_warps, states)


def _rule_flags(rule):
    z_clamp = getattr(rule, 'z_clamp', None)
    return dict(COEFFS=rule.tl_coeffs, HISTORY=rule.history, HAS_CLAMP=z_clamp is not None), \
        (0.0 if z_clamp is None else float(z_clamp))


def _last_contiguous(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _state_strides(X):
    """(s0, s1, s_n) for the kernels: (batch, group, state) of a (batch, G, N, L) tensor, or
    (channel, -, state) of a constant (dim, N) one."""
    if X.dim() == 4:
        return X.stride(0), X.stride(1), X.stride(2)
    return X.stride(0), 0, X.stride(1)


def _groups(B, C):
    return B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)


def _accumulators(u, A, B, C, D, delta_bias, rows, parts):
    """One fp32 buffer holding every gradient that is a sum (zeroed by the forward or by torch), and views."""
    batch, dim, L = u.shape
    N = A.shape[1]
    n_groups = _groups(B, C)
    shapes = {
        'dB': (parts, batch, n_groups, N, L) if B.dim() == 4 else (rows, dim, N),
        'dC': (parts, batch, n_groups, N, L) if C.dim() == 4 else (rows, dim, N),
        'dA': (rows, dim, N),
        'dD': (rows, dim if D is not None else 0),
        'dbias': (rows, dim if delta_bias is not None else 0),
    }
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    ws = torch.empty(sum(sizes.values()), device=u.device, dtype=torch.float32)
    views, start = {}, 0
    for k, s in shapes.items():
        views[k] = ws[start:start + sizes[k]].view(s)
        start += sizes[k]
    return ws, views


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, rule, reverse, cfg, store_state, ws, rev_from):
    """rev_from: None, or the first channel of a second, reverse direction sharing z (see bidirectional)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    group_size = dim // _groups(B, C)
    ln = _launch(cfg.block_d, _tile_l(cfg, L), cfg.num_warps, cfg.states, dim, group_size, N, False)
    n_tiles = triton.cdiv(L, ln.tile_l)
    out = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    state = torch.empty(batch, n_tiles if store_state else 1, dim, N, device=u.device, dtype=torch.float32)
    flags, z_clamp = _rule_flags(rule)
    z_ = z if z is not None else u
    grid = (triton.cdiv(dim, ln.block_d), batch)
    scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else u, z_, delta_bias if delta_bias is not None else u,
        out, state, ws if ws is not None else state, ws.numel() if ws is not None else 0,
        dim, L, N, group_size, n_tiles, z_clamp, rev_from or dim,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), z_.stride(0), z_.stride(1),
        out.stride(0), out.stride(1), A.stride(0), A.stride(1), *_state_strides(B), *_state_strides(C),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus),
        VAR_B=B.dim() == 4, VAR_C=C.dim() == 4, REVERSE=bool(reverse), BIDIR=rev_from is not None,
        STORE_STATE=store_state,
        ZERO_WS=ws is not None, BLOCK_D=ln.block_d, BLOCK_N=ln.block_n, TILE_L=ln.tile_l, STATES=ln.states,
        num_warps=ln.num_warps, **flags)
    return out, state


def _scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, rule, reverse, cfg, state, acc,
              deterministic, rev_from):
    """acc: (ws, views) zeroed in atomic mode, or None in deterministic mode (partials made here). With a
    second direction (rev_from) both directions' dz land in one (batch, dim, L) buffer, summed here."""
    batch, dim, L = u.shape
    N = A.shape[1]
    n_groups = _groups(B, C)
    group_size = dim // n_groups
    ln = _launch(cfg.block_d_bwd, _tile_l(cfg, L), cfg.num_warps_bwd, cfg.states_bwd, dim, group_size, N, True)
    n_tiles = triton.cdiv(L, ln.tile_l)
    n_dblocks = triton.cdiv(dim, ln.block_d)
    if deterministic:
        per_part = 4 * batch * n_groups * N * L * ((B.dim() == 4) + (C.dim() == 4))
        cap = max(1, DETERMINISTIC_PARTIAL_BYTES // max(1, per_part))
        d_split = cfg.d_split or max(1, min(n_dblocks, cap, triton.cdiv(_sm_count(u.device) * 4, batch)))
        blocks_per_prog = triton.cdiv(n_dblocks, d_split)
        d_split = triton.cdiv(n_dblocks, blocks_per_prog)
        ws, acc = _accumulators(u, A, B, C, D, delta_bias, rows=batch, parts=d_split)
        ws.zero_()
    else:
        d_split, blocks_per_prog = n_dblocks, 1
        ws, acc = acc
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(delta.shape, device=u.device, dtype=delta.dtype)
    dz = torch.empty(u.shape if rev_from else z.shape, device=u.device, dtype=z.dtype) if z is not None else None
    dz_, z_ = (dz, z) if z is not None else (du, u)
    dlast_ = dlast if dlast is not None else state
    flags, z_clamp = _rule_flags(rule)
    scan_bwd_kernel[(d_split, batch)](
        u, delta, A, B, C, D if D is not None else u, z_, delta_bias if delta_bias is not None else u, dout,
        state, dlast_, du, ddelta, dz_, acc['dB'], acc['dC'], acc['dA'], acc['dD'], acc['dbias'],
        dim, L, N, group_size, n_groups, n_tiles, n_dblocks, blocks_per_prog, batch, z_clamp, rev_from or dim,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), z_.stride(0), z_.stride(1),
        dout.stride(0), dout.stride(1), A.stride(0), A.stride(1), *_state_strides(B), *_state_strides(C),
        dlast_.stride(0), dlast_.stride(1), dlast_.stride(2), du.stride(0), du.stride(1),
        ddelta.stride(0), ddelta.stride(1), dz_.stride(0), dz_.stride(1),
        COEFFS_GRAD=rule.tl_coeffs_grad, EXP_ABAR=bool(rule.abar_is_exp), HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), VAR_B=B.dim() == 4,
        VAR_C=C.dim() == 4, REVERSE=bool(reverse), ADJOINT_REVERSE=not reverse, BIDIR=rev_from is not None,
        HAS_DLAST=dlast is not None,
        DETERMINISTIC=bool(deterministic), BLOCK_D=ln.block_d, BLOCK_N=ln.block_n, TILE_L=ln.tile_l,
        STATES=ln.states, num_warps=ln.num_warps, **flags)
    # deterministic: sum the partials in torch; atomic mode: one row each, a view (no launch)
    dB, dC, dA, dD, dbias = ((x.sum(0) if deterministic else x[0]) for x in
                             (acc['dB'], acc['dC'], acc['dA'], acc['dD'], acc['dbias']))
    if rev_from and dz is not None:
        dz = dz[:, :rev_from] + dz[:, rev_from:]
    return du, ddelta, dA, dB, dC, dD if D is not None else None, dz, dbias if delta_bias is not None else None


def _sm_count(device):
    if device.type != 'cuda':
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cast_pair(dB, dC, B_dtype, C_dtype):
    """dB, dC in their inputs' dtypes; adjacent fp32 blocks of one buffer are cast in one launch."""
    if dB.dtype == B_dtype and dC.dtype == C_dtype:
        return dB, dC
    if B_dtype == C_dtype and dB.shape == dC.shape and dB.is_contiguous() and dC.is_contiguous() \
            and dC.data_ptr() == dB.data_ptr() + 4 * dB.numel():
        both = torch.as_strided(dB, (2, *dB.shape), (dB.numel(), *dB.stride())).to(B_dtype)
        return both[0], both[1]
    return dB.to(B_dtype), dC.to(C_dtype)


class SelectiveScanFn(torch.autograd.Function):
    """Saves the inputs and the per-tile states; the backward recomputes everything else."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, rule, reverse,
                deterministic, cfg, need_grad, rev_from=None):
        u, delta, z = _last_contiguous(u), _last_contiguous(delta), _last_contiguous(z)
        squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
        B = _last_contiguous(B.unsqueeze(1) if squeeze_B else B)
        C = _last_contiguous(C.unsqueeze(1) if squeeze_C else C)
        D = D.contiguous() if D is not None else None
        delta_bias = delta_bias.contiguous() if delta_bias is not None else None
        # atomic mode: the forward zeroes the backward's accumulators (no memset launch in the backward)
        acc = _accumulators(u, A, B, C, D, delta_bias, 1, 1) if need_grad and not deterministic else None
        out, state = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, rule, reverse, cfg,
                               need_grad or return_last_state, acc[0] if acc else None, rev_from)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, state)
        ctx.acc, ctx.acc_fresh = acc, True
        ctx.meta = (delta_softplus, rule, reverse, deterministic, cfg, squeeze_B, squeeze_C, rev_from)
        if not return_last_state:
            return out
        return out, state[:, -1]

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, state = ctx.saved_tensors
        delta_softplus, rule, reverse, deterministic, cfg, squeeze_B, squeeze_C, rev_from = ctx.meta
        acc = ctx.acc
        if acc is not None and not ctx.acc_fresh:
            acc[0].zero_()  # a second backward through the same graph (retain_graph=True)
        ctx.acc_fresh = False
        du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(
            _last_contiguous(dout), dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, rule, reverse, cfg,
            state, acc, deterministic, rev_from)
        dB, dC = _cast_pair(dB, dC, B.dtype, C.dtype)
        dB = dB.squeeze(1) if squeeze_B else dB
        dC = dC.squeeze(1) if squeeze_C else dC
        dA = dA.to(A.dtype)
        dD = dD.to(D.dtype) if dD is not None else None
        dbias = dbias.to(delta_bias.dtype) if dbias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Checks and the public functions
# ----------------------------------------------------------------------------------------------------
def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Raise a ValueError naming the argument for any shape mamba-ssm's selective_scan_fn does not accept."""
    if u.dim() != 3 or u.shape[-1] < 1:
        raise ValueError(f'u must be (batch, dim, L) with L >= 1, got shape {tuple(u.shape)}')
    batch, dim, L = u.shape
    for name, x in (('delta', delta), ('z', z)):
        if x is not None and x.shape != u.shape:
            raise ValueError(f'{name} must have u\'s shape {tuple(u.shape)}, got {tuple(x.shape)}')
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f'A must be (dim={dim}, N), got shape {tuple(A.shape)}')
    if A.is_complex():
        raise ValueError('complex A is not supported: the rules are defined for real z <= 0')
    N = A.shape[1]
    for name, X in (('B', B), ('C', C)):
        if X.is_complex():
            raise ValueError(f'complex {name} is not supported')
        grouped = X.dim() == 4 and X.shape[0] == batch and X.shape[2:] == (N, L) and 0 < X.shape[1] and \
            dim % X.shape[1] == 0
        ok = (X.dim() == 2 and X.shape == (dim, N)) or (X.dim() == 3 and X.shape == (batch, N, L)) or grouped
        if not ok:
            raise ValueError(f'{name} must be constant (dim={dim}, N={N}), time-varying (batch={batch}, N, L={L}) '
                             f'or grouped (batch, G, N, L) with G dividing dim; got shape {tuple(X.shape)}')
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f'grouped B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}')
    for name, x in (('D', D), ('delta_bias', delta_bias)):
        if x is not None and x.shape != (dim,):
            raise ValueError(f'{name} must be (dim={dim},), got shape {tuple(x.shape)}')
    for name, x in (('u', u), ('delta', delta), ('A', A), ('B', B), ('C', C), ('D', D), ('z', z),
                    ('delta_bias', delta_bias)):
        if x is not None and (not x.is_floating_point() or x.device != u.device):
            raise ValueError(f'{name} must be a floating-point tensor on {u.device}, got {x.dtype} on {x.device}')


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, discretization='zoh', reverse=False, deterministic=None,
                          config=None):
    """The fused Triton kernels whatever the device (CPU needs TRITON_INTERPRET=1). `config`: a ScanConfig."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    rule = get_discretizer(discretization)
    if rule.tl_coeffs is None or rule.tl_coeffs_grad is None:
        raise ValueError(f'rule {rule.name!r} has no triton coefficient functions')
    if u.dtype == torch.float64:
        raise ValueError('the Triton scan computes in fp32: pass fp32/fp16/bf16 (float64 runs the torch scans)')
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, rule,
                                 bool(reverse), bool(deterministic), config or ScanConfig(), need_grad)


def _torch_scan(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, rule, reverse):
    """The torch scans take time-varying B/C in forward order: expand constants, flip for reverse."""
    batch, dim, L = u.shape
    if reverse:
        u, delta = u.flip(-1), delta.flip(-1)
        z = z.flip(-1) if z is not None else None
        B = B.flip(-1) if B.dim() > 2 else B
        C = C.flip(-1) if C.dim() > 2 else C
    # constant (dim, N) -> (batch, G = dim, N, L): one group per channel, a broadcast view
    B = B[None, :, :, None].expand(batch, dim, B.shape[1], L) if B.dim() == 2 else B
    C = C[None, :, :, None].expand(batch, dim, C.shape[1], L) if C.dim() == 2 else C
    res = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, rule)
    if not reverse:
        return res
    return (res[0].flip(-1), res[1]) if return_last_state else res.flip(-1)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, discretization='zoh', reverse=False, deterministic=None):
    """Selective scan with a pluggable discretization rule: mamba-ssm's signature, plus three keywords.

    h_t = Abar(z_t) h_{t-1} + delta_t sum_j w_j(z_t) B_t u_{t-j};  y_t = C_t h_t + D u_t  [* silu(z_t)]
    with z_t = delta_t A (after the rule's clamp), delta = softplus(delta + delta_bias) if delta_softplus.

    u, delta: (batch, dim, L) fp32/fp16/bf16; A: (dim, N) fp32, negative; B, C: time-varying (batch, N, L),
    grouped (batch, G, N, L) (channel d reads group d // (dim // G)) or constant (dim, N); D, delta_bias:
    (dim,) fp32; z: (batch, dim, L). Returns out (batch, dim, L) in u's dtype [, last_state (batch, dim, N)
    fp32]. The state and every sum are fp32. The gradient of last_state flows back (mamba-ssm ignores it).

    discretization: a rule name ('zoh', 'foh', 'bilinear', 'poly', 'highorder', 'rk4') or a Discretizer.
    reverse: scan from t = L-1 down to 0 (Vim's backward direction without flipping any tensor; last_state
    is then the state after t = 0). deterministic: an atomic-free backward (None: follows
    torch.are_deterministic_algorithms_enabled()).

    CUDA tensors run the fused Triton kernels (fp32/fp16/bf16); CPU and float64 tensors run
    `selective_scan_parallel`. VIM_DISC_SCAN=triton forces the Triton kernels (on CPU under
    TRITON_INTERPRET=1), =ref the sequential float64-exact reference.

    Example::
        out = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True,
                                discretization='foh')
    """
    mode = os.environ.get('VIM_DISC_SCAN', '')
    if mode not in ('', 'parallel', 'ref', 'triton'):
        raise ValueError(f"VIM_DISC_SCAN={mode!r}: expected 'triton', 'ref' or 'parallel'")
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, discretization)
    if mode == 'triton' or (mode == '' and u.is_cuda and u.dtype != torch.float64):
        return selective_scan_triton(*args, reverse=reverse, deterministic=deterministic)
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    if mode == 'ref':
        from ..naive import selective_scan_ref as fn
    else:
        from ..parallel import selective_scan_parallel as fn
    return _torch_scan(fn, *args, reverse=reverse)


def _check_bidirectional(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 4 or u.shape[1] != 2:
        raise ValueError(f'u must be (batch, 2, dim, L): the two directions, got shape {tuple(u.shape)}')
    batch, _, dim, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f'delta must have u\'s shape {tuple(u.shape)}, got {tuple(delta.shape)}')
    if A.dim() != 3 or A.shape[:2] != (2, dim):
        raise ValueError(f'A must be (2, dim={dim}, N), got shape {tuple(A.shape)}')
    for name, X in (('B', B), ('C', C)):
        if X.dim() != 4 or X.shape != (batch, 2, A.shape[2], L):
            raise ValueError(f'{name} must be (batch={batch}, 2, N={A.shape[2]}, L={L}), got shape {tuple(X.shape)}')
    for name, x in (('D', D), ('delta_bias', delta_bias)):
        if x is not None and x.shape != (2, dim):
            raise ValueError(f'{name} must be (2, dim={dim}), got shape {tuple(x.shape)}')
    if z is not None and z.shape != (batch, dim, L):
        raise ValueError(f'z must be (batch={batch}, dim={dim}, L={L}): one gate for both directions, '
                         f'got shape {tuple(z.shape)}')


def bidirectional_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                                 discretization='zoh', deterministic=None, config=None):
    """Vim's two scan directions over one sequence: direction 0 forward in time, direction 1 from t = L-1
    down to 0 (Vim's flipped direction, returned in original order), each gated by the same silu(z).

    u, delta: (batch, 2, dim, L); A: (2, dim, N); B, C: (batch, 2, N, L); D, delta_bias: (2, dim);
    z: (batch, dim, L). Returns (batch, 2, dim, L) in u's dtype: [:, r] = selective_scan_fn(u[:, r], ...,
    reverse=(r == 1)). Last strides must be 1 for the fused path (copies otherwise); other strides are free.

    On CUDA both directions run in ONE launch of each fused kernel: the 2 * dim channel rows of a layer are
    one grid (twice the programs in flight of two launches for the latency-bound scan), B/C read as two
    groups, and the programs of the second half run their tiles in reverse. Elsewhere, two selective_scan_fn
    calls (also on CUDA with VIM_DISC_BIDIR=two). `deterministic` as in selective_scan_fn; `config`: a ScanConfig
    for the one-launch path.
    """
    _check_bidirectional(u, delta, A, B, C, D, z, delta_bias)
    mode = os.environ.get('VIM_DISC_SCAN', '')
    launch = os.environ.get('VIM_DISC_BIDIR', 'one')
    if launch not in ('one', 'two'):
        raise ValueError(f"VIM_DISC_BIDIR={launch!r}: expected 'one' (one launch for both directions) or 'two'")
    if launch == 'two' or not (mode == 'triton' or (mode == '' and u.is_cuda and u.dtype != torch.float64)):
        # two scans (VIM_DISC_BIDIR=two keeps the two-launch form selectable for benchmarks)
        outs = [selective_scan_fn(u[:, r], delta[:, r], A[r], B[:, r], C[:, r], None if D is None else D[r], z,
                                  None if delta_bias is None else delta_bias[r], delta_softplus,
                                  discretization=discretization, reverse=r == 1, deterministic=deterministic)
                for r in (0, 1)]
        return torch.stack(outs, 1)
    batch, _, dim, L = u.shape
    rows = (batch, 2 * dim, L)
    u2, delta2 = u.reshape(rows), delta.reshape(rows)  # views for the usual (contiguous) layout
    A2 = A.reshape(2 * dim, A.shape[2])
    D2 = D.reshape(2 * dim) if D is not None else None
    bias2 = delta_bias.reshape(2 * dim) if delta_bias is not None else None
    check_inputs(u2, delta2, A2, B, C, D2, None, bias2)
    if z is not None and (not z.is_floating_point() or z.device != u.device):
        raise ValueError(f'z must be a floating-point tensor on {u.device}, got {z.dtype} on {z.device}')
    rule = get_discretizer(discretization)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    out = SelectiveScanFn.apply(u2, delta2, A2, B, C, D2, z, bias2, delta_softplus, False, rule, False,
                                bool(deterministic), config or ScanConfig(), need_grad, dim)
    return out.view(batch, 2, dim, L)
