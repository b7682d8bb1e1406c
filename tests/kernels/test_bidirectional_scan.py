"""Both Vim directions in one launch (bidirectional_selective_scan) against two reference scans.

The fused path runs under TRITON_INTERPRET=1 with small tiles and 2-channel blocks, so the second direction's
blocks start mid-grid, carries cross tiles in both directions, and the deterministic backward's program columns
walk blocks of both directions. B/C are strided views into one (batch, 2, R + 2N, L) projection output, the
layout the Vim mixer hands over. Freshly allocated buffers are NaN (tests/kernels/test_selective_scan.py's
fixture), so an unwritten element fails.
"""
import pytest
import torch

from kernels.naive import selective_scan_ref
from kernels.scan import ScanConfig, bidirectional_selective_scan
from kernels.scan.interface import _torch_scan
from tests.kernels.test_selective_scan import TOL, nan_empty  # noqa: F401  (autouse fixture)

SMALL = ScanConfig(tile_l=4, block_d=2, block_d_bwd=2, states=2, states_bwd=2)
NAMES = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias']


def make_inputs(batch=2, dim=5, L=13, N=3, R=2, seed=0):
    """float64 leaves in the mixer's layout; B and C are slices of one projection output."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    u = torch.randn(batch, 2, dim, L, **f64)
    delta = torch.randn(batch, 2, dim, L, **f64)
    A = -(torch.rand(2, dim, N, **f64) * 2.0 + 0.2)
    x_dbl = torch.randn(batch, 2, R + 2 * N, L, **f64)
    D = torch.randn(2, dim, **f64)
    z = torch.randn(batch, dim, L, **f64)
    bias = torch.randn(2, dim, **f64) * 0.5
    return [u, delta, A, x_dbl, D, z, bias], (R, N)


def _split(x_dbl, R, N):
    return x_dbl[:, :, R:R + N], x_dbl[:, :, R + N:]


def run_both(rule, deterministic=False, config=SMALL, **shape):
    (u, delta, A, x_dbl, D, z, bias), (R, N) = make_inputs(**shape)
    ours = [x.float().requires_grad_() for x in (u, delta, A, x_dbl, D, z, bias)]
    ref = [x.clone().requires_grad_() for x in (u, delta, A, x_dbl, D, z, bias)]
    ou, od, oA, ox, oD, oz, ob = ours
    out = bidirectional_selective_scan(ou, od, oA, *_split(ox, R, N), oD, oz, ob, delta_softplus=True,
                                       discretization=rule, deterministic=deterministic, config=config)
    ru, rd, rA, rx, rD, rz, rb = ref
    rB, rC = _split(rx, R, N)
    out_ref = torch.stack([
        _torch_scan(selective_scan_ref, ru[:, r], rd[:, r], rA[r], rB[:, r], rC[:, r], rD[r], rz, rb[r], True, False,
                    rule, reverse=r == 1) for r in (0, 1)], 1)
    grad = torch.randn(out_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out.backward(grad.float())
    out_ref.backward(grad)
    results = {'out': (out, out_ref)}
    for name, x, r in zip(['u', 'delta', 'A', 'x_dbl (dB, dC)', 'D', 'z', 'delta_bias'], ours, ref):
        results['d' + name] = (x.grad, r.grad)
    return results


def assert_all_close(results):
    for name, (got, want) in results.items():
        assert got is not None, f'{name}: no gradient'
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m, name=name: f'{name}: {m}')


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setenv('VIM_DISC_SCAN', 'triton')


@pytest.mark.parametrize('rule', ['zoh', 'foh', 'bilinear'])
def test_both_directions_every_gradient(rule):
    """zoh (2-tuple backward), foh (history lags across tiles, both signs), bilinear (the lag scan)."""
    assert_all_close(run_both(rule))


@pytest.mark.parametrize('rule', ['zoh', 'poly'])
def test_deterministic_backward(rule):
    """Program columns of the deterministic backward walk blocks of both directions (dim 5: 3 blocks each)."""
    results = run_both(rule, deterministic=True, config=ScanConfig(tile_l=4, block_d=2, block_d_bwd=2, d_split=2))
    assert_all_close(results)


def test_default_launch_shape_odd_sizes():
    assert_all_close(run_both('highorder', config=None, batch=1, dim=3, L=7, N=5))


def test_matches_two_calls_of_the_torch_path(monkeypatch):
    """The CPU dispatch (two selective_scan_fn calls) gives the fused launch's result."""
    (u, delta, A, x_dbl, D, z, bias), (R, N) = make_inputs()
    args = [x.float() for x in (u, delta, A)] + [x.float() for x in _split(x_dbl, R, N)] + \
        [D.float(), z.float(), bias.float()]
    fused_out = bidirectional_selective_scan(*args, delta_softplus=True, discretization='rk4', config=SMALL)
    monkeypatch.setenv('VIM_DISC_SCAN', 'parallel')
    torch_out = bidirectional_selective_scan(*args, delta_softplus=True, discretization='rk4')
    torch.testing.assert_close(fused_out, torch_out, **TOL)


@pytest.mark.parametrize('bad, match', [
    (dict(u=(2, 3, 5, 13)), 'u must be'),
    (dict(A=(5, 3)), 'A must be'),
    (dict(B=(2, 3, 13)), 'B must be'),
    (dict(D=(5,)), 'D must be'),
    (dict(z=(2, 10, 13)), 'z must be'),
])
def test_bad_shapes(bad, match):
    shapes = dict(u=(2, 2, 5, 13), delta=(2, 2, 5, 13), A=(2, 5, 3), B=(2, 2, 3, 13), C=(2, 2, 3, 13), D=(2, 5),
                  z=(2, 5, 13), delta_bias=(2, 5))
    shapes.update(bad)
    if 'u' in bad:
        shapes['delta'] = bad['u']
    with pytest.raises(ValueError, match=match):
        bidirectional_selective_scan(**{k: torch.randn(*v) for k, v in shapes.items()})
