"""The fused Triton selective scan against the float64 reference, on CPU through TRITON_INTERPRET=1.

Shapes are tiny and odd, and the launch shape is forced small (4-step tiles, 2-channel blocks, two states per
trip with N = 3 so the second trip overshoots) so that every path runs: carries across tiles, a short last
tile, history terms crossing tiles, channel blocks, groups, constant B/C, both scan directions, the
deterministic backward. Freshly allocated buffers are NaN, so an element a kernel forgets to write (or an
accumulator the forward forgets to zero) fails the check. The interpreter runs programs one at a time, so
races and bf16 are left to tests/gpu.
"""
import pytest
import torch

from kernels.discretization import RULES, get_discretizer
from kernels.naive import selective_scan_ref
from kernels.scan import ScanConfig, selective_scan_fn, selective_scan_triton
from kernels.scan.interface import _torch_scan
from tests.kernels.user_rules import ForwardEuler

SMALL = ScanConfig(tile_l=4, block_d=2, block_d_bwd=2, states=2, states_bwd=2)
TOL = dict(rtol=6e-4, atol=2e-3)  # mamba-ssm's fp32 tolerances
NAMES = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias']


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Freshly allocated buffers hold NaN, so an element a kernel forgets to write fails the check."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float('nan')) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty', lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **k: nan_fill(empty_like(*a, **k)))


def make_inputs(batch=2, dim=5, L=19, N=3, groups=0, has_D=True, has_z=True, has_bias=True, softplus=True,
                delta_scale=1.0, seed=0, constant=''):
    """float64 leaves. z = delta * A reaches about -5, past rk4's clamp and bilinear's sign change."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    u = torch.randn(batch, dim, L, **f64)
    delta = (torch.randn(batch, dim, L, **f64) if softplus else torch.rand(batch, dim, L, **f64) * 2.0) * delta_scale
    A = -(torch.rand(dim, N, **f64) * 2.0 + 0.2)
    shape = (batch, N, L) if not groups else (batch, groups, N, L)
    B = torch.randn(dim, N, **f64) if 'B' in constant else torch.randn(*shape, **f64)
    C = torch.randn(dim, N, **f64) if 'C' in constant else torch.randn(*shape, **f64)
    D = torch.randn(dim, **f64) if has_D else None
    z = torch.randn(batch, dim, L, **f64) if has_z else None
    bias = torch.randn(dim, **f64) * 0.5 if has_bias else None
    return [u, delta, A, B, C, D, z, bias]


def run_both(inputs, rule, softplus, last_state, config, reverse=False, deterministic=False):
    """Forward + backward of the Triton scan (fp32) and the reference (float64) on one upstream gradient."""
    ours = [x.float().requires_grad_() if x is not None else None for x in inputs]
    ref = [x.clone().requires_grad_() if x is not None else None for x in inputs]
    out = selective_scan_triton(*ours, delta_softplus=softplus, return_last_state=last_state, discretization=rule,
                                reverse=reverse, deterministic=deterministic, config=config)
    out_ref = _torch_scan(selective_scan_ref, *ref, softplus, last_state, rule, reverse=reverse)
    if not last_state:
        out, out_ref = (out,), (out_ref,)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, dtype=torch.float64, generator=g) for o in out_ref]
    torch.autograd.backward(out, [gr.float() for gr in grads])
    torch.autograd.backward(out_ref, grads)
    results = {}
    for i, (o, r) in enumerate(zip(out, out_ref)):
        results['out' if i == 0 else 'last_state'] = (o, r)
    for name, x, r in zip(NAMES, ours, ref):
        if x is not None:
            results['d' + name] = (x.grad, r.grad)
    return results


def assert_all_close(results):
    assert results, 'nothing compared'
    for name, (got, want) in results.items():
        assert got is not None, f'{name}: no gradient'
        assert got.dtype != torch.float64 and got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m, name=name: f'{name}: {m}')


ALL_RULES = sorted(RULES) + ['euler']


def _rule(name):
    return ForwardEuler() if name == 'euler' else get_discretizer(name)


@pytest.mark.parametrize('reverse', [False, True], ids=['fwd', 'rev'])
@pytest.mark.parametrize('rule', ALL_RULES)
def test_every_rule_every_gradient(rule, reverse):
    """D, gate, bias, softplus, last state; 5 tiles (the last one short), 3 channel blocks, both directions."""
    inputs = make_inputs()
    if rule == 'euler':
        inputs[7] = inputs[7] - 2.0  # forward Euler is stable only for z >= -2: smaller steps
    results = run_both(inputs, _rule(rule), softplus=True, last_state=True, config=SMALL, reverse=reverse)
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


@pytest.mark.parametrize('constant', ['B', 'C', 'BC'])
@pytest.mark.parametrize('rule', ['zoh', 'foh'])
def test_constant_B_C(rule, constant):
    """mamba-ssm's is_variable_B/C=False: B and/or C a constant (dim, N) fp32 matrix; their gradients sum over
    batch and time. Reverse for C alone, grouped time-varying B beside a constant C."""
    inputs = make_inputs(L=11, dim=4, groups=2 if constant == 'C' else 0, constant=constant)
    results = run_both(inputs, _rule(rule), True, True, SMALL, reverse=constant == 'C')
    assert results['dB'][0].shape == inputs[3].shape and results['dC'][0].shape == inputs[4].shape
    assert_all_close(results)


@pytest.mark.parametrize('config', [
    ScanConfig(tile_l=8),                                         # defaults for the rest
    ScanConfig(tile_l=4, block_d=4, block_d_bwd=1, num_warps=2, states=1, states_bwd=1),
], ids=['tile8', 'uneven'])
def test_launch_shapes_agree(config):
    """Tiles, channel blocks, warps and states per trip change the schedule, not the result (foh: history)."""
    assert_all_close(run_both(make_inputs(L=15, batch=1), get_discretizer('foh'), True, True, config))


@pytest.mark.parametrize('rule', ['poly', 'rk4'])
def test_deterministic_backward(rule):
    """deterministic=True (partials owned by one program, summed in torch; 2 program columns over 3 channel
    blocks) against the reference, and equal to the atomic backward to rounding."""
    cfg = ScanConfig(tile_l=4, block_d=2, block_d_bwd=2, d_split=2)
    inputs = make_inputs(L=10, groups=0)
    det = run_both(inputs, _rule(rule), True, True, cfg, deterministic=True)
    assert_all_close(det)
    atomic = run_both(inputs, _rule(rule), True, True, cfg, deterministic=False)
    for name in det:
        torch.testing.assert_close(det[name][0], atomic[name][0], rtol=1e-5, atol=1e-6)


def test_deterministic_follows_torch_flag(monkeypatch):
    """deterministic=None takes torch.are_deterministic_algorithms_enabled()."""
    import kernels.scan.interface as interface
    seen = []
    monkeypatch.setattr(interface.SelectiveScanFn, 'apply', lambda *a: seen.append(a[12]) or a[0])
    u, delta, A, B, C = [x.float() for x in make_inputs(L=4, dim=2)[:5]]
    monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: True)
    selective_scan_triton(u, delta, A, B, C)
    monkeypatch.setattr(torch, 'are_deterministic_algorithms_enabled', lambda: False)
    selective_scan_triton(u, delta, A, B, C)
    selective_scan_triton(u, delta, A, B, C, deterministic=True)
    assert seen == [True, False, True]


def test_second_backward_through_the_graph():
    """retain_graph: the forward zeroed the accumulators once; a second backward zeroes them again."""
    leaves = [x.float().requires_grad_() for x in make_inputs(L=9, dim=3)]
    out = selective_scan_triton(*leaves, delta_softplus=True, discretization='foh', config=SMALL)
    dout = torch.randn_like(out)
    out.backward(dout, retain_graph=True)
    first = [x.grad.clone() for x in leaves]
    out.backward(dout)
    for name, x, g in zip(NAMES, leaves, first):
        torch.testing.assert_close(x.grad, 2 * g, msg=lambda m, n=name: f'd{n}: {m}')


def test_no_grad_forward_and_last_state():
    """Under no_grad nothing is zeroed or saved for a backward; last_state is still returned."""
    inputs = [x.float() for x in make_inputs(L=9)]
    with torch.no_grad():
        out, last = selective_scan_triton(*inputs, delta_softplus=True, return_last_state=True, config=SMALL)
    out_ref, last_ref = selective_scan_ref(*inputs, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(last, last_ref, **TOL)


def test_non_contiguous_inputs():
    """Views with a unit last stride run in place (their strides go to the kernel); others are copied."""
    u, delta, A, B, C, D, z, bias = make_inputs(L=11)
    wide = torch.zeros(u.shape[0], u.shape[1], u.shape[2] + 3)
    wide[..., 1:-2] = u.float()
    wide.requires_grad_()
    u_view = wide[..., 1:-2]                                    # channel stride L + 3
    delta_t = delta.float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # last stride L
    A_t = A.float().t().contiguous().t()                        # A with strides (1, dim)
    assert u_view.stride(1) == u.shape[2] + 3 and delta_t.stride(-1) != 1 and A_t.stride(0) == 1
    rule = get_discretizer('poly')
    out = selective_scan_triton(u_view, delta_t, A_t, B.float(), C.float(), D.float(), z.float(),
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
    """Backward keeps the inputs and one state per tile, (batch, n_tiles, dim, N), never (batch, dim, L, N)."""
    batch, dim, L, N = 2, 5, 19, 3
    leaves = [x.float().requires_grad_() if x is not None else None for x in make_inputs(batch, dim, L, N)]
    out = selective_scan_triton(*leaves, delta_softplus=True, config=SMALL)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    tiles = -(-L // SMALL.tile_l)
    assert (batch, tiles, dim, N) in [tuple(t.shape) for t in saved]
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
    zc = torch.tensor(rule.z_clamp, dtype=torch.float64)
    assert abs(float(rule.abar(zc)) - 1.0) < 1e-9


@pytest.mark.parametrize('mode', ['parallel', 'ref'])
def test_torch_paths_reverse_and_constant(mode, monkeypatch):
    """The CPU paths take reverse=True and constant B/C too: equal to scanning the flipped sequence."""
    monkeypatch.setenv('VIM_DISC_SCAN', mode)
    u, delta, A, B, C, D, z, bias = make_inputs(L=7, dim=3, constant='C')
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, True, 'foh', reverse=True)
    flipped = [x.flip(-1) for x in (u, delta, B)]
    C_t = C[None, :, :, None].expand(u.shape[0], 3, C.shape[1], 7)
    want, want_last = selective_scan_ref(flipped[0], flipped[1], A, flipped[2], C_t, D, z.flip(-1), bias, True,
                                         True, 'foh')
    torch.testing.assert_close(out, want.flip(-1))
    torch.testing.assert_close(last, want_last)


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


def _bad(**changes):
    u, delta, A, B, C, D, z, bias = [x.float() for x in make_inputs(L=4, dim=4, N=2)]
    args = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    args.update(changes)
    return args


@pytest.mark.parametrize('changes, match', [
    (dict(B=torch.randn(4, 3)), 'B must be constant'),                              # (dim, N) with the wrong N
    (dict(C=torch.randn(2, 3, 2, 4)), 'C must be constant'),                        # 3 groups do not divide dim 4
    (dict(B=torch.randn(2, 2, 2, 4), C=torch.randn(2, 4, 2, 4)), 'same number of groups'),
    (dict(B=torch.randn(2, 2, 5)), 'B must be constant'),                           # wrong L
    (dict(A=torch.randn(3, 2)), 'A must be'),
    (dict(A=torch.randn(4, 2, dtype=torch.complex64)), 'complex A'),
    (dict(D=torch.randn(3)), 'D must be'),
    (dict(delta_bias=torch.randn(4, 1)), 'delta_bias must be'),
    (dict(z=torch.randn(2, 4, 5)), 'z must have'),
    (dict(delta=torch.randn(2, 4)), 'delta must have'),
    (dict(u=torch.randn(2, 4)), 'u must be'),
    (dict(B=torch.ones(2, 2, 4, dtype=torch.int32)), 'floating-point'),
], ids=['const-B-N', 'groups-divide', 'group-mismatch', 'B-length', 'A-shape', 'A-complex', 'D-shape', 'bias-shape',
        'z-shape', 'delta-shape', 'u-rank', 'B-int'])
def test_bad_shapes_are_value_errors(changes, match):
    """Any shape mamba-ssm's selective_scan_fn does not accept is a ValueError naming it, on every path."""
    with pytest.raises(ValueError, match=match):
        selective_scan_triton(**_bad(**changes), config=SMALL)
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(**_bad(**changes))


def test_bad_arguments():
    inputs = [x.float() if x is not None else None for x in make_inputs(L=4, dim=2)]
    with pytest.raises(ValueError, match='tile_l'):
        selective_scan_triton(*inputs, config=ScanConfig(tile_l=2))
    with pytest.raises(ValueError, match='block_d'):
        selective_scan_triton(*inputs, config=ScanConfig(block_d=3))
    with pytest.raises(ValueError, match='states per trip'):
        selective_scan_triton(*inputs, config=ScanConfig(states=3))
    with pytest.raises(ValueError, match='unknown discretization'):
        selective_scan_triton(*inputs, discretization='euler')
    with pytest.raises(ValueError, match='fp32'):
        selective_scan_triton(*[x.double() for x in inputs])
