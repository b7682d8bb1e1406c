"""The fused Triton selective scan against the float64 reference, on CPU through TRITON_INTERPRET=1.

Shapes are tiny and odd, and the launch shape is forced small (4-step tiles, 2-tile chunks, several
channel blocks and splits) so that every path runs: chunk summaries and the carry pass, a short last
chunk, history terms crossing tiles and chunks, channel splits, groups. The interpreter runs programs
one at a time, so races and bf16 are left to tests/gpu/test_scan_gpu.py.
"""
import pytest
import torch

from kernels.discretization import RULES, get_discretizer
from kernels.naive import selective_scan_ref
from kernels.selective_scan import ScanConfig, selective_scan_fn, selective_scan_triton
from tests.kernels.user_rules import ForwardEuler

# 4-step tiles, states saved every 2 tiles, forward chunks of 4 tiles and backward chunks of 2, 2 channels
# per block, 2 splits of the backward, 2 states per trip of the state loop (N = 3: the second trip overshoots)
SMALL = ScanConfig(tile_l=4, seg_tiles=2, block_d=2, block_d_bwd=2, chunk_tiles=4, bwd_chunk_tiles=2, d_split=2,
                   states_per_trip=2, states_per_trip_bwd=2)
TOL = dict(rtol=6e-4, atol=2e-3)  # mamba-ssm's fp32 tolerances


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Freshly allocated buffers hold NaN, so an element a kernel forgets to write fails the check."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float('nan')) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty', lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **k: nan_fill(empty_like(*a, **k)))


def make_inputs(batch=2, dim=5, L=19, N=3, groups=0, has_D=True, has_z=True, has_bias=True, softplus=True,
                delta_scale=1.0, seed=0):
    """float64 leaves. z = delta * A reaches about -5, past rk4's clamp and bilinear's sign change."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    u = torch.randn(batch, dim, L, **f64)
    delta = (torch.randn(batch, dim, L, **f64) if softplus else torch.rand(batch, dim, L, **f64) * 2.0) * delta_scale
    A = -(torch.rand(dim, N, **f64) * 2.0 + 0.2)
    shape = (batch, N, L) if not groups else (batch, groups, N, L)
    B = torch.randn(*shape, **f64)
    C = torch.randn(*shape, **f64)
    D = torch.randn(dim, **f64) if has_D else None
    z = torch.randn(batch, dim, L, **f64) if has_z else None
    bias = torch.randn(dim, **f64) * 0.5 if has_bias else None
    return [u, delta, A, B, C, D, z, bias]


def run_both(inputs, rule, softplus, last_state, config):
    """Forward + backward of the Triton scan (fp32) and the reference (float64) on one upstream gradient."""
    names = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias']
    ours = [x.float().requires_grad_() if x is not None else None for x in inputs]
    ref = [x.clone().requires_grad_() if x is not None else None for x in inputs]
    out = selective_scan_triton(*ours, delta_softplus=softplus, return_last_state=last_state,
                                discretization=rule, config=config)
    out_ref = selective_scan_ref(*ref, delta_softplus=softplus, return_last_state=last_state,
                                 discretization=rule)
    if not last_state:
        out, out_ref = (out,), (out_ref,)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in out_ref]
    torch.autograd.backward(out, [gr.float() for gr in grads])
    torch.autograd.backward(out_ref, grads)
    results = {}
    for i, (o, r) in enumerate(zip(out, out_ref)):
        results['out' if i == 0 else 'last_state'] = (o, r)
    for name, x, r in zip(names, ours, ref):
        if x is not None:
            results['d' + name] = (x.grad, r.grad)
    return results


def assert_all_close(results):
    assert results, 'nothing compared'
    for name, (got, want) in results.items():
        assert got is not None, f'{name}: no gradient'
        assert got.dtype != torch.float64, name
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m, name=name: f'{name}: {m}')


ALL_RULES = sorted(RULES) + ['euler']


def _rule(name):
    return ForwardEuler() if name == 'euler' else get_discretizer(name)


@pytest.mark.parametrize('rule', ALL_RULES)
def test_every_rule_every_gradient(rule):
    """D, gate, bias, softplus, last state; 3 chunks (the last one short), 3 channel blocks in 2 splits."""
    inputs = make_inputs()
    if rule == 'euler':
        inputs[7] = inputs[7] - 2.0  # forward Euler is stable only for z >= -2: smaller steps
    results = run_both(inputs, _rule(rule), softplus=True, last_state=True, config=SMALL)
    assert set(results) == {'out', 'last_state', 'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'dz', 'ddelta_bias'}
    assert_all_close(results)


@pytest.mark.parametrize('rule', ['zoh', 'highorder'])
@pytest.mark.parametrize('case', [
    dict(has_D=False, has_z=False, has_bias=False, softplus=False, last_state=False, batch=1, L=13),
    dict(groups=2, dim=6, L=11, batch=1),
    dict(L=1),
    dict(L=5, batch=1, dim=3, N=4),
], ids=['bare', 'grouped', 'L1', 'one-tile'])
def test_options_and_shapes(rule, case):
    case = dict(case)
    softplus = case.pop('softplus', True)
    last_state = case.pop('last_state', True)
    inputs = make_inputs(softplus=softplus, **case)
    assert_all_close(run_both(inputs, _rule(rule), softplus, last_state, SMALL))


@pytest.mark.parametrize('config', [
    ScanConfig(tile_l=8),                       # one chunk per row, one split: no summary passes
    ScanConfig(tile_l=4, seg_tiles=1, chunk_tiles=1, bwd_chunk_tiles=3, block_d=4, block_d_bwd=1, d_split=5,
               states_per_trip=4),
], ids=['unchunked', 'uneven'])
def test_launch_shapes_agree(config):
    """Chunking, channel blocks and splits change the schedule, not the result (foh: history crosses)."""
    assert_all_close(run_both(make_inputs(L=15, batch=1), get_discretizer('foh'), True, True, config))


def test_non_contiguous_inputs():
    """Views with a unit last stride run in place (their strides go to the kernel); others are copied."""
    u, delta, A, B, C, D, z, bias = make_inputs(L=11)
    wide = torch.zeros(u.shape[0], u.shape[1], u.shape[2] + 3)
    wide[..., 1:-2] = u.float()
    wide.requires_grad_()
    u_view = wide[..., 1:-2]                                    # channel stride L + 3
    delta_t = delta.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # last stride L
    assert u_view.stride(1) == u.shape[2] + 3 and delta_t.stride(-1) != 1
    rule = get_discretizer('poly')
    out = selective_scan_triton(u_view, delta_t, A.float(), B.float(), C.float(), D.float(), z.float(),
                                bias.float(), delta_softplus=True, discretization=rule, config=SMALL)
    ref_u, ref_delta = u.clone().requires_grad_(), delta.clone().requires_grad_()
    out_ref = selective_scan_ref(ref_u, ref_delta, A, B, C, D, z, bias, delta_softplus=True, discretization=rule)
    grad = torch.randn_like(out_ref)
    out.backward(grad.float())
    out_ref.backward(grad)
    torch.testing.assert_close(out.double(), out_ref, **TOL)
    torch.testing.assert_close(wide.grad[..., 1:-2].double(), ref_u.grad, **TOL)
    assert torch.count_nonzero(wide.grad[..., :1]) == 0 and torch.count_nonzero(wide.grad[..., -2:]) == 0
    torch.testing.assert_close(delta_t.grad.double(), ref_delta.grad, **TOL)


def test_saves_no_state_tensor():
    """Backward keeps the inputs and one state per segment (SEG x TILE_L steps), never (batch, dim, L, N)."""
    batch, dim, L, N = 2, 5, 19, 3
    leaves = [x.float().requires_grad_() if x is not None else None for x in make_inputs(batch, dim, L, N)]
    out = selective_scan_triton(*leaves, delta_softplus=True, config=SMALL)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    segments = -(-L // (SMALL.seg_tiles * SMALL.tile_l))
    assert [t.shape for t in saved if t.shape == (batch, segments, N, dim)] == [(batch, segments, N, dim)]
    assert max(t.numel() for t in saved) <= batch * dim * L  # nothing larger than one input


def test_rk4_clamp_forward_and_zero_gradient_below_bound():
    """rk4 clamps z at its stability bound: the output equals the reference's, and with every z below the
    bound A has no influence at all (dA == 0 exactly) while delta still scales the input term."""
    rule = get_discretizer('rk4')
    assert rule.z_clamp is not None and rule.z_clamp < -2.78
    inputs = make_inputs(softplus=False, has_bias=False, L=9)
    inputs[1] = inputs[1].abs() + 3.0      # delta >= 3
    inputs[2] = -(inputs[2].abs() + 1.0)   # A <= -1, so z <= -3, below the bound -2.785
    results = run_both(inputs, rule, softplus=False, last_state=True, config=SMALL)
    assert_all_close(results)
    assert torch.count_nonzero(results['dA'][0]) == 0
    assert torch.count_nonzero(results['ddelta'][0]) > 0
    # Abar at the bound is 1: the clamped state does not decay, unlike the unclamped degree-4 Taylor.
    zc = torch.tensor(rule.z_clamp, dtype=torch.float64)
    assert abs(float(rule.abar(zc)) - 1.0) < 1e-9


def test_backward_is_deterministic():
    """No atomics: two backward passes give bitwise equal gradients."""
    inputs = [x.float() if x is not None else None for x in make_inputs(L=10, batch=1)]
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() if x is not None else None for x in inputs]
        out = selective_scan_triton(*leaves, delta_softplus=True, discretization='poly', config=SMALL)
        out.backward(torch.ones_like(out))
        grads.append([x.grad for x in leaves if x is not None])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_dispatch(monkeypatch):
    """CPU tensors take the parallel scan, VIM_DISC_SCAN=ref the reference, =triton the kernels."""
    u, delta, A, B, C, D, z, bias = [x.float() if x is not None else None for x in make_inputs(L=6, dim=3)]
    args = (u, delta, A, B, C, D, z, bias, True, False, 'foh')
    import kernels.parallel as parallel
    calls = []
    monkeypatch.setattr(parallel, 'selective_scan_parallel', lambda *a: calls.append('parallel') or u)
    monkeypatch.delenv('VIM_DISC_SCAN', raising=False)
    assert selective_scan_fn(*args) is u and calls == ['parallel']
    monkeypatch.setenv('VIM_DISC_SCAN', 'ref')
    torch.testing.assert_close(selective_scan_fn(*args), selective_scan_ref(*args))
    monkeypatch.setenv('VIM_DISC_SCAN', 'triton')
    torch.testing.assert_close(selective_scan_fn(*args), selective_scan_ref(*args), **TOL)
    monkeypatch.setenv('VIM_DISC_SCAN', 'cuda')
    with pytest.raises(ValueError, match='VIM_DISC_SCAN'):
        selective_scan_fn(*args)


def test_bad_arguments():
    inputs = [x.float() if x is not None else None for x in make_inputs(L=4, dim=2)]
    with pytest.raises(ValueError, match='tile_l'):
        selective_scan_triton(*inputs, config=ScanConfig(tile_l=2))
    with pytest.raises(ValueError, match='multiple of seg_tiles'):
        selective_scan_triton(*inputs, config=ScanConfig(tile_l=4, seg_tiles=2, chunk_tiles=3))
    with pytest.raises(ValueError, match='unknown discretization'):
        selective_scan_triton(*inputs, discretization='euler')
