"""The six discretization rules: accuracy of phi_k, weights and their z-derivatives (torch and Triton),
stability of Abar, the clamp, and the rule registry.

References are independent float64 closed forms written from the spec's phi formulas (Taylor series
near 0, the recursion phi_{k+1} = (phi_k - 1/k!)/z elsewhere), in numpy, not the module's chi basis.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kernels.discretization import (MAX_HISTORY, RK4, RULES, SERIES_RADIUS, Bilinear, chi,
                                    get_discretizer, lagrange_in_r, phi, tl_chi, tl_phi)
from tests.kernels.user_rules import ForwardEuler

FP32_RTOL = 1e-5

# z grid: log-spaced over [-1e4, -1e-8], dense around the series/recursion switch and |z| ~ 1, and 0.
Z_GRID = np.unique(np.concatenate([
    -np.logspace(-8, 4, 241),
    -np.linspace(0.0, 8.0, 161),
    -(SERIES_RADIUS + np.array([-1e-6, -1e-7, 0.0, 1e-6, 1e-5])),
]))


# ------------------------------------------------------------------ float64 references (spec formulas)
def phi_ref(k, z):
    """phi_k(z) in float64: Taylor sum_m z^m/(m+k)! for |z| <= 2, the recursion from e^z beyond."""
    z = np.asarray(z, dtype=np.float64)
    taylor = sum(z ** m / math.factorial(m + k) for m in range(45))
    rec = np.exp(z)
    with np.errstate(divide='ignore', invalid='ignore'):
        for j in range(k):
            rec = (rec - 1.0 / math.factorial(j)) / z
    return np.where(np.abs(z) <= 2.0, taylor, rec)


def dphi_ref(k, z):
    """phi_k'(z) = phi_k - k phi_{k+1} near 0; (phi_{k-1} - k phi_k)/z (no cancellation) for |z| > 2."""
    z = np.asarray(z, dtype=np.float64)
    if k == 0:
        return np.exp(z)
    near = phi_ref(k, z) - k * phi_ref(k + 1, z)
    with np.errstate(divide='ignore', invalid='ignore'):
        far = (phi_ref(k - 1, z) - k * phi_ref(k, z)) / z
    return np.where(np.abs(z) <= 2.0, near, far)


# Each rule's weights as linear combinations of phi_k, written from the spec: {j: {k: coefficient}}.
PHI_WEIGHTS = {
    'foh': {0: {2: 1.0}, 1: {1: 1.0, 2: -1.0}},
    'poly': {0: {3: 1.0, 2: 0.5}, 1: {1: 1.0, 3: -2.0}, 2: {3: 1.0, 2: -0.5}},
    # Cubic Lagrange on s = -2..1 integrated against e^{z(1-s)}, int s^k = k! phi_{k+1}.
    'highorder': {0: {4: 1.0, 3: 1.0, 2: 1.0 / 3.0}, 1: {1: 1.0, 2: 0.5, 3: -2.0, 4: -3.0},
                  2: {4: 3.0, 3: 1.0, 2: -1.0}, 3: {2: 1.0 / 6.0, 4: -1.0}},
}


def rule_ref(name, z):
    """(abar, [w_j], dabar, [dw_j]) in float64 from the spec's formulas, plus the sum of |terms| of each
    (for rk4's and bilinear's explicit formulas, which cross zero; None where there is no root)."""
    z = np.asarray(z, dtype=np.float64)
    if name in PHI_WEIGHTS:
        rows = [PHI_WEIGHTS[name][j] for j in sorted(PHI_WEIGHTS[name])]
        ws = [sum(c * phi_ref(k, z) for k, c in row.items()) for row in rows]
        dws = [sum(c * dphi_ref(k, z) for k, c in row.items()) for row in rows]
        return np.exp(z), ws, np.exp(z), dws, None
    if name == 'zoh':
        return np.exp(z), [np.ones_like(z)], np.exp(z), [np.zeros_like(z)], None
    if name == 'bilinear':
        q = 1 / (1 - z / 2)
        values = ((1 + z / 2) * q, [q], q ** 2, [0.5 * q ** 2])
        scales = ((1 + np.abs(z) / 2) * q, [q], q ** 2, [0.5 * q ** 2])
        return (*values, scales)
    assert name == 'rk4', name

    def poly(coefs, absolute=False):
        return sum((abs(c) * np.abs(z) ** i if absolute else c * z ** i) for i, c in enumerate(coefs))
    table = ([1, 1, 1 / 2, 1 / 6, 1 / 24], [[1 / 2, 1 / 6, 1 / 24], [1 / 2, 1 / 3, 1 / 8, 1 / 24]],
             [1, 1, 1 / 2, 1 / 6], [[1 / 6, 1 / 12], [1 / 3, 1 / 4, 1 / 8]])
    values = (poly(table[0]), [poly(c) for c in table[1]], poly(table[2]), [poly(c) for c in table[3]])
    scales = (poly(table[0], True), [poly(c, True) for c in table[1]], poly(table[2], True),
              [poly(c, True) for c in table[3]])
    return (*values, scales)


FP32_TINY = float(np.finfo(np.float32).tiny)


def rel_err(got, ref, scale=None):
    """|got - ref| relative to |ref|; where a formula crosses zero, relative to 1% of its |terms| sum
    instead (no fp32 evaluation is relatively accurate at a root); never below fp32's smallest normal."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.maximum(np.abs(ref), FP32_TINY)
    if scale is not None:
        denom = np.maximum(denom, 1e-2 * np.asarray(scale))
    return np.abs(got - ref) / denom


def rule_domain(rule):
    """The z the rule is evaluated on in a scan: the grid, clamped by the rule's default clamp."""
    z = Z_GRID if rule.z_clamp is None else Z_GRID[Z_GRID >= rule.z_clamp]
    return z


# ------------------------------------------------------------------ phi and chi
@pytest.mark.parametrize('k', [1, 2, 3, 4])
def test_phi_fp32_matches_float64_closed_form(k):
    z = torch.tensor(Z_GRID, dtype=torch.float32)
    z64 = z.double().numpy()  # compare at the fp32-rounded arguments
    zg = z.clone().requires_grad_()
    value = phi(k, zg)
    (grad,) = torch.autograd.grad(value.sum(), zg)
    assert value.dtype == torch.float32
    assert rel_err(value.detach(), phi_ref(k, z64)).max() <= FP32_RTOL
    assert rel_err(grad, dphi_ref(k, z64)).max() <= FP32_RTOL


def test_phi_at_zero_and_bf16_upcast():
    zero = torch.zeros(3)
    for k in range(5):
        assert torch.allclose(phi(k, zero), torch.full((3,), 1 / math.factorial(k)), rtol=FP32_RTOL, atol=0)
    zb = torch.tensor(Z_GRID, dtype=torch.bfloat16)
    for k in (1, 2, 3, 4):
        value = phi(k, zb)
        assert value.dtype == torch.float32  # bf16 arguments are evaluated in fp32
        assert rel_err(value, phi_ref(k, zb.double().numpy())).max() <= FP32_RTOL


def test_phi_float64_is_exact_to_rounding():
    z = torch.tensor(Z_GRID, dtype=torch.float64)
    for k in (1, 2, 3, 4):
        assert rel_err(phi(k, z), phi_ref(k, Z_GRID)).max() <= 1e-13


def test_chi_is_the_integral_and_its_derivative_is_the_next_chi():
    # chi_m(z) = int_0^1 e^{z r} r^m dr by Gauss-Legendre (exact enough for |z| <= 30 with 60 nodes).
    nodes, wts = np.polynomial.legendre.leggauss(60)
    r = (nodes + 1) / 2
    z = np.linspace(-30, 0, 61)
    z_t = torch.tensor(z, requires_grad=True)
    chis = chi(4, z_t)
    for m in range(5):
        quad = (np.exp(np.outer(z, r)) * r ** m) @ wts / 2
        assert rel_err(chis[m].detach(), quad).max() <= 1e-12
    (grad,) = torch.autograd.grad(chis[2].sum(), z_t)
    assert torch.allclose(grad, chis[3].detach(), rtol=1e-14, atol=0)
    assert torch.autograd.gradcheck(lambda x: chi(3, x), (torch.tensor([-0.3, -3.99, -4.01, -12.0],
                                                                        dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_chi_does_not_depend_on_the_other_lanes(dtype):
    # The torch side splits lanes into bands (|z| < 1, < 4, beyond) and cuts each series to the largest
    # |z| of its band: any mix of lanes must give the same values lane by lane.
    z = torch.tensor(Z_GRID, dtype=dtype)
    abs_z = z.abs()
    small = abs_z < SERIES_RADIUS
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    mixed = chi(4, z)
    for part in (small, ~small, abs_z < 0.1, (abs_z >= 1) & small, abs_z < 1.5):
        alone = chi(4, z[part])
        for m in range(5):
            assert rel_err(alone[m], mixed[m][part]).max() <= tol
    for m, value in enumerate(chi(4, z[:1])):  # z = -1e4 alone
        assert rel_err(value, mixed[m][:1]).max() <= tol


# ------------------------------------------------------------------ rules, torch side
def test_lagrange_basis_in_r_interpolates_the_nodes():
    for history in range(MAX_HISTORY + 1):
        rows = lagrange_in_r(history)
        for j, row in enumerate(rows):
            for node in range(history + 1):
                assert sum(c * node ** m for m, c in enumerate(row)) == (1 if node == j else 0)


@pytest.mark.parametrize('name', sorted(RULES))
def test_rule_fp32_weights_and_derivatives_match_float64(name):
    rule = get_discretizer(name)
    z = torch.tensor(rule_domain(rule), dtype=torch.float32)
    abar_ref, w_ref, dabar_ref, dw_ref, scales = rule_ref(name, z.double().numpy())
    scales = scales or (None, [None] * len(w_ref), None, [None] * len(w_ref))
    zg = z.clone().requires_grad_()
    abar = rule.abar(zg)
    weights = rule.input_weights(zg)
    assert len(weights) == rule.history + 1
    assert rel_err(abar.detach(), abar_ref, scales[0]).max() <= FP32_RTOL
    (dabar,) = torch.autograd.grad(abar.sum(), zg, retain_graph=True)
    assert rel_err(dabar, dabar_ref, scales[2]).max() <= FP32_RTOL
    for j, w in enumerate(weights):
        assert w.dtype == torch.float32
        assert rel_err(w.detach(), w_ref[j], scales[1][j]).max() <= FP32_RTOL, f'w_{j}'
        if not w.requires_grad:  # a constant weight (zoh's w_0 = 1)
            assert np.all(dw_ref[j] == 0)
        else:
            (dw,) = torch.autograd.grad(w.sum(), zg, retain_graph=True)
            assert rel_err(dw, dw_ref[j], scales[3][j]).max() <= FP32_RTOL, f'dw_{j}'


@pytest.mark.parametrize('name', ['foh', 'poly', 'highorder'])
def test_exponential_hold_weights_sum_to_phi1(name):
    # A constant input is then integrated exactly: the rule reduces to exact ZOH.
    rule = get_discretizer(name)
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, FP32_RTOL)):
        z = torch.tensor(Z_GRID, dtype=dtype)
        total = sum(rule.input_weights(z))
        assert rel_err(total, phi_ref(1, z.double().numpy())).max() <= tol


def test_hold_weights_at_zero_are_the_quadrature_weights():
    # Spec: poly (5, 8, -1)/12 (j = 0, 1, 2); highorder Adams-Moulton (9, 19, -5, 1)/24; foh (1, 1)/2.
    expected = {'foh': [Fraction(1, 2)] * 2, 'poly': [Fraction(5, 12), Fraction(8, 12), Fraction(-1, 12)],
                'highorder': [Fraction(9, 24), Fraction(19, 24), Fraction(-5, 24), Fraction(1, 24)]}
    for name, ws in expected.items():
        got = get_discretizer(name).input_weights(torch.zeros(1, dtype=torch.float64))
        assert [float(w) for w in got] == pytest.approx([float(w) for w in ws], rel=1e-15, abs=1e-16)


# ------------------------------------------------------------------ stability and the clamp
def test_rk4_stability_bound_is_the_root_of_abar_equals_one():
    rule = get_discretizer('rk4')
    bound = rule.z_stable
    assert RK4.clamp_default and rule.z_clamp == bound
    at = rule.abar(torch.tensor([bound], dtype=torch.float64)).item()
    assert abs(at - 1.0) < 1e-14
    beyond = rule.abar(torch.tensor([bound - 1e-6, bound - 1.0], dtype=torch.float64))
    assert (beyond > 1).all()


@pytest.mark.parametrize('name', sorted(RULES))
def test_abar_bounded_on_reachable_steps(name):
    rule = get_discretizer(name)  # default clamp: on for rk4 only
    z = rule.clamp_z(torch.tensor(Z_GRID, dtype=torch.float64))
    abar = rule.abar(z)
    assert (abar.abs() <= 1 + 1e-15).all()
    if name == 'bilinear':
        assert (abar[z < -2] < 0).all() and (abar[z > -2] > 0).all()  # Tustin flips sign below z = -2
    else:
        assert (abar >= 0).all() and (abar[z > -700] > 0).all()  # e^z underflows to 0 in float64


def test_clamp_options_and_gradient():
    assert get_discretizer('rk4').z_clamp is not None
    assert RK4(clamp=False).z_clamp is None
    assert RK4(z_clamp=-1.0).z_clamp == -1.0
    assert get_discretizer('foh').z_clamp is None
    assert RULES['foh'](z_clamp=-5.0).z_clamp == -5.0
    with pytest.raises(ValueError):
        Bilinear(clamp=True)  # stable everywhere: no default bound to clamp at
    with pytest.raises(ValueError):
        Bilinear(clamp=False, z_clamp=-1.0)
    rule = get_discretizer('rk4')
    z = torch.tensor([-10.0, -3.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    zc = rule.clamp_z(z)
    assert torch.equal(zc.detach()[:2], torch.full((2,), rule.z_clamp, dtype=torch.float64))
    (grad,) = torch.autograd.grad(rule.abar(zc).sum(), z)
    assert torch.equal(grad[:2], torch.zeros(2, dtype=torch.float64))  # below the clamp: no gradient
    assert torch.allclose(grad[2:], torch.tensor(rule_ref('rk4', [-2.0, -0.5])[2], dtype=torch.float64), rtol=1e-14)


def test_registry_names_and_errors():
    assert sorted(RULES) == ['bilinear', 'foh', 'highorder', 'poly', 'rk4', 'zoh']
    for name, cls in RULES.items():
        rule = get_discretizer(name)
        assert isinstance(rule, cls) and rule.name == name
        assert rule.tl_coeffs is not None and rule.tl_coeffs_grad is not None
    assert get_discretizer(RULES['poly']).name == 'poly'
    instance = RK4(clamp=False)
    assert get_discretizer(instance) is instance
    with pytest.raises(ValueError, match='bilinear, foh, highorder, poly, rk4, zoh'):
        get_discretizer('euler')


# ------------------------------------------------------------------ a user-defined rule
def test_user_rule_plugs_in():
    rule = get_discretizer(ForwardEuler(clamp=True))
    assert rule.z_clamp == -2.0 and rule.history == 0
    z = torch.tensor([-3.0, -1.0])
    assert torch.equal(rule.abar(rule.clamp_z(z)), torch.tensor([-1.0, 0.0]))


# ------------------------------------------------------------------ Triton side (interpreter on CPU)
@triton.jit
def _eval_coeffs_kernel(z_ptr, out_ptr, n, COEFFS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    abar, w0, w1, w2, w3 = COEFFS(z)
    tl.store(out_ptr + offs, abar, mask=mask)
    tl.store(out_ptr + n + offs, w0, mask=mask)
    tl.store(out_ptr + 2 * n + offs, w1, mask=mask)
    tl.store(out_ptr + 3 * n + offs, w2, mask=mask)
    tl.store(out_ptr + 4 * n + offs, w3, mask=mask)


@triton.jit
def _eval_coeffs_grad_kernel(z_ptr, out_ptr, n, COEFFS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    abar, w0, w1, w2, w3, dabar, dw0, dw1, dw2, dw3 = COEFFS_GRAD(z)
    tl.store(out_ptr + offs, abar, mask=mask)
    tl.store(out_ptr + n + offs, w0, mask=mask)
    tl.store(out_ptr + 2 * n + offs, w1, mask=mask)
    tl.store(out_ptr + 3 * n + offs, w2, mask=mask)
    tl.store(out_ptr + 4 * n + offs, w3, mask=mask)
    tl.store(out_ptr + 5 * n + offs, dabar, mask=mask)
    tl.store(out_ptr + 6 * n + offs, dw0, mask=mask)
    tl.store(out_ptr + 7 * n + offs, dw1, mask=mask)
    tl.store(out_ptr + 8 * n + offs, dw2, mask=mask)
    tl.store(out_ptr + 9 * n + offs, dw3, mask=mask)


@triton.jit
def _eval_phi_chi_kernel(z_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    p1, p2, p3, p4 = tl_phi(z)
    c0, c1, c2, c3, c4 = tl_chi(z)
    tl.store(out_ptr + offs, p1, mask=mask)
    tl.store(out_ptr + n + offs, p2, mask=mask)
    tl.store(out_ptr + 2 * n + offs, p3, mask=mask)
    tl.store(out_ptr + 3 * n + offs, p4, mask=mask)
    tl.store(out_ptr + 4 * n + offs, c0, mask=mask)
    tl.store(out_ptr + 5 * n + offs, c1, mask=mask)
    tl.store(out_ptr + 6 * n + offs, c2, mask=mask)
    tl.store(out_ptr + 7 * n + offs, c3, mask=mask)
    tl.store(out_ptr + 8 * n + offs, c4, mask=mask)


def _device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _run_elementwise(kernel, z, n_out, **meta):
    z = z.to(_device(), torch.float32).contiguous()
    out = torch.full((n_out, z.numel()), float('nan'), device=z.device)  # unwritten lanes stay NaN
    block = 128
    kernel[(triton.cdiv(z.numel(), block),)](z, out, z.numel(), BLOCK=block, **meta)
    return out.cpu().double().numpy()


def test_triton_phi_and_chi_match_float64():
    z = torch.tensor(Z_GRID, dtype=torch.float32)
    z64 = z.double().numpy()
    out = _run_elementwise(_eval_phi_chi_kernel, z, 9)
    for k in range(1, 5):
        assert rel_err(out[k - 1], phi_ref(k, z64)).max() <= FP32_RTOL, f'phi_{k}'
    chis = chi(4, z.double())
    for m in range(5):
        assert rel_err(out[4 + m], chis[m].numpy()).max() <= FP32_RTOL, f'chi_{m}'


@pytest.mark.parametrize('name', sorted(RULES))
def test_triton_coeffs_match_float64(name):
    rule = get_discretizer(name)
    z = torch.tensor(rule_domain(rule), dtype=torch.float32)
    abar_ref, w_ref, dabar_ref, dw_ref, scales = rule_ref(name, z.double().numpy())
    pad = [np.zeros_like(abar_ref)] * (MAX_HISTORY + 1 - len(w_ref))
    expected = [abar_ref, *w_ref, *pad, dabar_ref, *dw_ref, *pad]
    scales = (None,) * 10 if scales is None else [scales[0], *scales[1], *[None] * len(pad), scales[2],
                                                  *scales[3], *[None] * len(pad)]
    fwd = _run_elementwise(_eval_coeffs_kernel, z, 5, COEFFS=rule.tl_coeffs)
    both = _run_elementwise(_eval_coeffs_grad_kernel, z, 10, COEFFS_GRAD=rule.tl_coeffs_grad)
    assert np.array_equal(fwd, both[:5])  # the grad variant returns the same values
    for i, (got, ref, scale) in enumerate(zip(both, expected, scales)):
        assert rel_err(got, ref, scale).max() <= FP32_RTOL, f'output {i}'


def test_triton_user_rule():
    rule = ForwardEuler()
    z = torch.tensor([-1.5, -0.25, 0.0])
    both = _run_elementwise(_eval_coeffs_grad_kernel, z, 10, COEFFS_GRAD=rule.tl_coeffs_grad)
    assert np.array_equal(both[0], rule.abar(z).double().numpy())
    assert np.array_equal(both[1], np.ones(3)) and np.array_equal(both[5], np.ones(3))
