"""The reference scan (the oracle) and the CPU path against it.

- zoh is mamba-ssm's selective_scan_ref, bit for bit in fp32;
- the hold rules integrate polynomial inputs of their degree exactly (float64, vs the closed-form ODE
  solution), rk4 is four explicit RK4 stages, bilinear is the Tustin step;
- gradcheck of the reference for every rule; the parallel path equals it in outputs, last state and
  every gradient, fp32 and float64, odd L, grouped B/C.
"""
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

from kernels.discretization import RULES, get_discretizer
from kernels.naive import selective_scan_ref
from kernels.parallel import linear_recurrence, selective_scan_parallel

ALL_RULES = sorted(RULES)


def make_inputs(batch=2, dim=4, length=7, n_state=3, groups=None, dtype=torch.float64, seed=0,
                options=True, requires_grad=False, a_scale=1.0):
    """Random scan inputs; options=True adds D, z, delta_bias and uses softplus on raw delta."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    inputs = dict(
        u=rnd(batch, dim, length),
        # raw delta around softplus^-1(0.3) with options, else a positive step in [0.05, 1.05]
        delta=(rnd(batch, dim, length) - 1.0) if options else
        (torch.rand(batch, dim, length, generator=g, dtype=torch.float64) + 0.05).to(dtype),
        A=(-a_scale * torch.exp(torch.randn(dim, n_state, generator=g, dtype=torch.float64) * 0.8)).to(dtype),
        B=rnd(*bc_shape), C=rnd(*bc_shape))
    if options:
        inputs.update(D=rnd(dim), z=rnd(batch, dim, length), delta_bias=rnd(dim, scale=0.5))
    if requires_grad:
        for t in inputs.values():
            t.requires_grad_()
    kwargs = dict(delta_softplus=options)
    return inputs, kwargs


# ------------------------------------------------------------------ zoh == mamba-ssm
def _mamba_selective_scan_ref():
    # the oracle is part of the environment, not optional: a missing one must not pass as a skip
    if importlib.util.find_spec('mamba_ssm') is None:
        pytest.fail('mamba-ssm is not installed: it is the oracle for zoh; run scripts/setup_env.sh, which installs '
                    'it (mamba-ssm==2.3.2.post1, no CUDA build needed)', pytrace=False)
    # mamba-ssm imports its CUDA extension at module level; its reference needs none of it.
    sys.modules.setdefault('selective_scan_cuda', types.ModuleType('selective_scan_cuda'))
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as mamba_ref
    return mamba_ref


@pytest.mark.parametrize('groups', [None, 2], ids=['BC', 'grouped'])
@pytest.mark.parametrize('options', [False, True], ids=['plain', 'D-z-bias-softplus'])
def test_zoh_is_mamba_reference_bit_for_bit(groups, options):
    mamba_ref = _mamba_selective_scan_ref()
    inputs, kwargs = make_inputs(length=9, groups=groups, dtype=torch.float32, options=options)
    ours, ours_state = selective_scan_ref(**inputs, **kwargs, return_last_state=True)
    theirs, theirs_state = mamba_ref(**inputs, **kwargs, return_last_state=True)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours_state, theirs_state)


# ------------------------------------------------------------------ exactness of the hold rules
def _ode_solution(a, v_coefs, h0, t0, times):
    """h(T) for h' = a h + v(tau), h(t0) = h0, v a polynomial (numpy coefficients, lowest first).

    A polynomial particular solution p = -sum_k v^(k)/a^(k+1) gives h(T) = e^{a(T-t0)}(h0 - p(t0)) + p(T).
    """
    v = np.polynomial.Polynomial(v_coefs)
    p = -sum(v.deriv(k) / a ** (k + 1) for k in range(len(v_coefs)))
    return np.exp(a * (times - t0)) * (h0 - p(t0)) + p(times)


@pytest.mark.parametrize('name', ['foh', 'poly', 'highorder'])
def test_hold_rules_integrate_polynomials_of_their_degree_exactly(name):
    rule = get_discretizer(name)
    degree = rule.history
    a = np.array([-0.4, -2.5, -9.0])          # one channel per a, N = 1, B = C = 1: y_t = h_t
    step, length = 0.35, 16
    times = step * np.arange(length)
    rng = np.random.default_rng(1)

    def run(v_coefs):
        v = np.polynomial.Polynomial(v_coefs)(times)
        u = torch.tensor(np.tile(v, (3, 1)))[None]
        y = selective_scan_ref(u, torch.full_like(u, step), torch.tensor(a)[:, None],
                               torch.ones(1, 1, length, dtype=torch.float64),
                               torch.ones(1, 1, length, dtype=torch.float64), discretization=name)[0].numpy()
        # From t0 = K on every step sees K+1 true samples, so it must be the exact flow of the ODE.
        t0 = degree
        exact = np.stack([_ode_solution(a[d], v_coefs, y[d, t0], times[t0], times[t0:]) for d in range(3)])
        return np.abs(y[:, t0:] - exact).max() / np.abs(exact).max()

    assert run(rng.normal(size=degree + 1)) < 1e-13
    # A degree higher is not reproduced: the check above can fail.
    assert run(rng.normal(size=degree + 2)) > 1e-6


def test_rk4_is_four_explicit_stages():
    inputs, _ = make_inputs(batch=1, dim=2, length=11, n_state=2, options=False, seed=3)
    u, delta, A, B, C = (inputs[k] for k in 'u delta A B C'.split())
    out, last = selective_scan_ref(u, delta, A, B, C, return_last_state=True, discretization='rk4')
    for d in range(2):
        for n in range(2):
            a, h, v_prev = A[d, n].item(), 0.0, 0.0
            for t in range(u.shape[2]):
                dt, v_now = delta[0, d, t].item(), B[0, n, t].item() * u[0, d, t].item()
                v_mid = 0.5 * (v_prev + v_now)  # v linear between the samples
                k1 = a * h + v_prev
                k2 = a * (h + dt / 2 * k1) + v_mid
                k3 = a * (h + dt / 2 * k2) + v_mid
                k4 = a * (h + dt * k3) + v_now
                h = h + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
                v_prev = v_now
            assert math.isclose(last[0, d, n].item(), h, rel_tol=1e-13, abs_tol=1e-15)
    # max(delta * |A|) < 2.785 here, so the default clamp never bit
    assert (delta[0, :, :, None] * A[:, None, :]).min() > get_discretizer('rk4').z_clamp


def test_bilinear_is_the_tustin_step():
    inputs, _ = make_inputs(batch=1, dim=2, length=9, n_state=2, options=False, seed=4)
    inputs['delta'] = inputs['delta'] * 6  # reach z < -2, where Abar < 0
    u, delta, A, B, C = (inputs[k] for k in 'u delta A B C'.split())
    _, last = selective_scan_ref(u, delta, A, B, C, return_last_state=True, discretization='bilinear')
    z = delta[0, :, :, None] * A[:, None, :]
    assert (z < -2).any()
    h = torch.zeros(2, 2, dtype=torch.float64)
    for t in range(u.shape[2]):
        zt = z[:, t]
        h = ((1 + zt / 2) * h + delta[0, :, t, None] * B[0, None, :, t] * u[0, :, t, None]) / (1 - zt / 2)
    assert torch.allclose(last[0], h, rtol=1e-13, atol=0)


# ------------------------------------------------------------------ gradients of the reference
GRAD_CASES = [
    dict(groups=None, options=False),
    dict(groups=2, options=True),
]


@pytest.mark.parametrize('case', GRAD_CASES, ids=['plain', 'grouped-D-z-bias-softplus'])
@pytest.mark.parametrize('name', ALL_RULES)
def test_reference_gradcheck(name, case):
    # rk4: larger |A| so that its default clamp acts on some steps
    inputs, kwargs = make_inputs(batch=2, dim=4, length=5, n_state=2, seed=5, requires_grad=True,
                                 a_scale=4.0 if name == 'rk4' else 1.0, **case)
    if name == 'rk4':
        # The default clamp must act on some lanes and stay clear of the kink on all of them.
        delta = inputs['delta'].detach()
        if case['options']:
            delta = torch.nn.functional.softplus(delta + inputs['delta_bias'].detach()[:, None])
        z = (delta[..., None] * inputs['A'].detach()[:, None, :]).flatten()
        bound = get_discretizer('rk4').z_clamp
        assert (z < bound).any() and (z > bound).any() and (z - bound).abs().min() > 1e-4
    names = list(inputs)

    def fn(*tensors):
        return selective_scan_ref(**dict(zip(names, tensors)), **kwargs, return_last_state=True,
                                  discretization=name)
    assert torch.autograd.gradcheck(fn, tuple(inputs.values()), eps=1e-6, atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ the CPU path == the reference
def _scan_and_grads(fn, inputs, kwargs, name, grad_out, grad_state):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out, state = fn(**leaves, **kwargs, return_last_state=True, discretization=name)
    grads = torch.autograd.grad((out, state), list(leaves.values()), (grad_out.to(out.dtype), grad_state))
    return out, state, dict(zip(leaves, grads))


def _assert_close(got, ref, rtol, what):
    atol = rtol * max(ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f'{what}: {m}')


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=['f64', 'f32'])
@pytest.mark.parametrize('groups', [None, 3], ids=['BC', 'grouped'])
@pytest.mark.parametrize('length', [1, 7, 33])
@pytest.mark.parametrize('name', ALL_RULES)
def test_parallel_matches_reference(name, length, groups, dtype):
    options = length != 1 or groups is None  # L = 1 also runs without D, z, bias, softplus
    inputs, kwargs = make_inputs(batch=2, dim=6, length=length, n_state=5, groups=groups, dtype=dtype,
                                 seed=length, options=options)
    g = torch.Generator().manual_seed(7)
    grad_out = torch.randn(2, 6, length, generator=g, dtype=torch.float64).to(dtype)
    grad_state = torch.randn(2, 6, 5, generator=g, dtype=torch.float64).to(dtype)
    ref = _scan_and_grads(selective_scan_ref, inputs, kwargs, name, grad_out, grad_state)
    par = _scan_and_grads(selective_scan_parallel, inputs, kwargs, name, grad_out, grad_state)
    rtol = 1e-11 if dtype == torch.float64 else 2e-5
    assert par[0].dtype == dtype and par[1].dtype == dtype
    _assert_close(par[0], ref[0], rtol, 'out')
    _assert_close(par[1], ref[1], rtol, 'last_state')
    for key in ref[2]:
        _assert_close(par[2][key], ref[2][key], rtol, f'd{key}')


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_inputs_keep_an_fp32_state(dtype):
    inputs, kwargs = make_inputs(length=6, dtype=dtype)
    for fn in (selective_scan_ref, selective_scan_parallel):
        out, state = fn(**inputs, **kwargs, return_last_state=True, discretization='poly')
        assert out.dtype == dtype and state.dtype == torch.float32
    ref = selective_scan_ref(**inputs, **kwargs, discretization='poly')
    par = selective_scan_parallel(**inputs, **kwargs, discretization='poly')
    assert torch.allclose(par.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.float().abs().max().item())


def test_linear_recurrence_with_negative_coefficients():
    # Bilinear's Abar is negative below z = -2: the recurrence must not go through log-space.
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(9, 2, 3, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    b = torch.randn(9, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h = linear_recurrence(a, b)
    expected, prev = [], torch.zeros(2, 3, dtype=torch.float64)
    for t in range(9):
        prev = a[t] * prev + b[t]
        expected.append(prev)
    assert torch.allclose(h, torch.stack(expected), rtol=1e-14, atol=1e-15)
    assert torch.autograd.gradcheck(linear_recurrence, (a, b))
