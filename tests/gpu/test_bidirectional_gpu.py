"""Both Vim directions in one launch on CUDA (kernels.bidirectional_selective_scan) against the two-launch form
(two selective_scan_fn calls, the second reverse=True), at the detection shape (d_inner 384, L 4096) and odd
ones, every rule, fp32 and bf16, every gradient; the deterministic backward bitwise repeatable.
"""
import pytest
import torch

from kernels.scan import bidirectional_selective_scan

pytestmark = pytest.mark.gpu

TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}


def make_inputs(batch, dim, L, N, dtype, R=12, seed=0):
    """The mixer's layout: u, delta (batch, 2, dim, L); B and C slices of one (batch, 2, R + 2N, L) tensor."""
    g = torch.Generator(device='cuda').manual_seed(seed)
    kw = dict(device='cuda', generator=g)
    u = torch.randn(batch, 2, dim, L, **kw).to(dtype)
    delta = torch.randn(batch, 2, dim, L, **kw).to(dtype)
    A = -(torch.rand(2, dim, N, **kw) * 2.0 + 0.2)
    x_dbl = torch.randn(batch, 2, R + 2 * N, L, **kw).to(dtype)
    D = torch.randn(2, dim, **kw)
    z = torch.randn(batch, 2 * dim, L, **kw).to(dtype)[:, dim:]  # a channel slice, as the mixer's gate is
    bias = torch.randn(2, dim, **kw) * 0.5
    return [u, delta, A, x_dbl, D, z, bias], (R, N)


def run(launch, monkeypatch, inputs, RN, rule, deterministic=False, grad_seed=1):
    monkeypatch.setenv('VIM_DISC_BIDIR', launch)
    R, N = RN
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    u, delta, A, x_dbl, D, z, bias = leaves
    out = bidirectional_selective_scan(u, delta, A, x_dbl[:, :, R:R + N], x_dbl[:, :, R + N:], D, z, bias,
                                       delta_softplus=True, discretization=rule, deterministic=deterministic)
    g = torch.randn(out.shape, device='cuda', generator=torch.Generator(device='cuda').manual_seed(grad_seed))
    out.backward(g.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


NAMES = ['out', 'du', 'ddelta', 'dA', 'dx_dbl', 'dD', 'dz', 'dbias']


# zoh (2-tuple backward), foh (history lags), rk4 (clamp, lag scan); every rule runs through the backbone tests
@pytest.mark.parametrize('rule, dtype', [('zoh', torch.float32), ('zoh', torch.bfloat16), ('foh', torch.bfloat16),
                                         ('rk4', torch.bfloat16)], ids=['zoh-fp32', 'zoh-bf16', 'foh-bf16', 'rk4-bf16'])
def test_one_launch_equals_two(rule, dtype, monkeypatch):
    inputs, RN = make_inputs(2, 384, 4096, 16, dtype)
    one = run('one', monkeypatch, inputs, RN, rule)
    two = run('two', monkeypatch, inputs, RN, rule)
    for name, a, b in zip(NAMES, one, two):
        # the same kernels on the same rows; only the order of fp32 atomic sums (dB/dC, dA...) differs
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m, n=name: f'{n}: {m}')


@pytest.mark.parametrize('shape', [(1, 5, 37, 3), (3, 33, 1000, 16), (2, 64, 2049, 8)])
def test_odd_shapes(shape, monkeypatch):
    inputs, RN = make_inputs(*shape, torch.float32, R=3)
    for a, b, name in zip(run('one', monkeypatch, inputs, RN, 'foh'), run('two', monkeypatch, inputs, RN, 'foh'),
                          NAMES):
        torch.testing.assert_close(a, b, **TOL[torch.float32], msg=lambda m, n=name: f'{n}: {m}')


def test_deterministic_is_bitwise_repeatable(monkeypatch):
    inputs, RN = make_inputs(2, 384, 4096, 16, torch.bfloat16)
    first = run('one', monkeypatch, inputs, RN, 'zoh', deterministic=True)
    second = run('one', monkeypatch, inputs, RN, 'zoh', deterministic=True)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
