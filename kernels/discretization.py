"""Discretization rules for the selective scan: Abar(z) and the input weights w_j(z).

For one channel and state, with z_t = delta_t * a (a < 0) and v_t = B_t u_t, every rule is

    h_t = Abar(z_t) h_{t-1} + delta_t * sum_{j=0..K} w_j(z_t) v_{t-j}        (v_{-1} = v_{-2} = ... = 0)

Each rule is written once here, twice over: torch methods (any dtype; the reference scan, the CPU path,
the SSM statistics) and ``@triton.jit`` functions on fp32 blocks (the fused kernel takes them as
``tl.constexpr`` arguments). Tests hold the two sides to each other and to float64 closed forms.

The exponential-hold rules (foh, poly, highorder) integrate a polynomial through v_t..v_{t-K} exactly.
With r = 1 - s measured back from t in steps (node r = j is v_{t-j}) the weights are

    w_j(z) = int_0^1 e^{z r} L_j(r) dr = sum_m l_{jm} chi_m(z),     chi_m(z) = int_0^1 e^{z r} r^m dr,

with L_j the Lagrange basis on the nodes r = 0..K and d chi_m / dz = chi_{m+1}. The chi basis is what
keeps fp32 accurate: at large |z| each chi_m ~ m!/|z|^{m+1}, so a weight is dominated by its lowest term
instead of being a difference of phi_k ~ 1/|z| that cancels (foh's w_1 = phi_1 - phi_2 ~ 1/z^2).
chi_m = e^z m! phi_{m+1}(-z): a series with positive terms for |z| < 4, an upward recursion (stable once
|z| exceeds m) beyond. See docs/discretization.md for the derivations and the measured accuracy.
"""
import math
from fractions import Fraction

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

MAX_HISTORY = 3

# |z| below this: positive series times e^z; above: upward recursion. Measured in fp32: worst relative
# error of chi_0..chi_5 over z in [-1e4, 0] is 7e-7 at 4.0 with 16 terms (2.4e-6 at 3.0, 1e-4 at 1.0).
SERIES_RADIUS = 4.0
# The series is run for S_M with M >= 4, then recurred down; a larger M converges faster.
_SERIES_MIN_TOP = 4
_SERIES_MAX_TERMS = 40


def _compute_dtype(z):
    """fp32 for fp32/fp16/bf16 (bf16 inputs are upcast), float64 stays float64."""
    return torch.promote_types(z.dtype, torch.float32)


def _series_length(x_max, big_m, eps):
    """Terms of S_M(x) = sum_i c_i x^i, c_i = M!/(i+M+1)!, needed on [0, x_max] for relative error eps/2.

    Stops at the first omitted term below eps/4 of S_M(0) = 1/(M+1) <= S_M(x) once the term ratio
    x/(i+M+2) is below 1/2, so the whole tail is below eps/2 of the sum. Short for the small z of a
    typical scan (8 terms at |z| <= 1 in fp32), 15 at the radius.
    """
    target = 0.25 * eps / (big_m + 1)
    term, n = 1.0 / (big_m + 1), 1
    while n < _SERIES_MAX_TERMS:
        term *= x_max / (n + big_m + 1)  # c_n / c_{n-1} = 1/(n+M+1)
        if term <= target and x_max <= 0.5 * (n + big_m + 2):
            break
        n += 1
    return n


def _chi_recursion(z, top):
    """chi_0..chi_top by the upward recursion, for |z| >= SERIES_RADIUS (stable once |z| > m)."""
    ez = torch.exp(z)
    rz = torch.reciprocal(z)
    chis = [(ez - 1.0).mul_(rz)]  # chi_0 = (e^z - 1)/z; |z| >= 4 so no expm1 needed
    for m in range(1, top + 1):
        chis.append((ez - m * chis[-1]).mul_(rz))  # chi_m = (e^z - m chi_{m-1}) / z
    return chis


def _chi_series(z, top, eps, excluded=()):
    """chi_0..chi_top from the positive series of S_M(-z), for |z| < SERIES_RADIUS.

    Lanes in `excluded` (index tuples) get x = 0, finite values for the caller to overwrite, so the
    series length follows the largest |z| among the others.
    """
    big_m = max(top, _SERIES_MIN_TOP)
    x = z.neg()
    for index in excluded:
        x.index_put_(index, x.new_zeros(()))
    n_terms = _series_length(float(x.abs().max()), big_m, eps)
    # S_M(x) = sum_i x^i M!/(i+M+1)! = M! phi_{M+1}(x): positive terms for x >= 0, so no cancellation.
    coef = [math.factorial(big_m) / math.factorial(i + big_m + 1) for i in range(n_terms)]
    s = torch.full_like(x, coef[-1])
    for c in reversed(coef[:-1]):
        s.mul_(x).add_(c)
    ez = torch.exp(-x)
    chi_m = s.mul_(ez)  # chi_M = e^z S_M(-z)
    chis = [None] * (top + 1)
    for m in range(big_m, 0, -1):
        if m <= top:
            chis[m] = chi_m
        chi_m = torch.addcmul(ez, x, chi_m).div_(m)  # chi_{m-1} = (e^z + x chi_m)/m: positives again
    chis[0] = chi_m
    return chis


# Lanes with |z| in [_SERIES_BULK, SERIES_RADIUS) run their own, longer series when they are a minority,
# so that the bulk of a typical scan (|z| < 1: 8 terms in fp32) does not pay for 16.
_SERIES_BULK = 1.0


@torch.no_grad()
def _chi_values(z, top):
    """chi_0(z) .. chi_top(z) without autograd, in z's dtype (fp32 or float64).

    On CPU the coefficients are most of the cost of the hold rules, so each lane pays only for its
    band: the series over all lanes is cut to the largest |z| of the bulk, the minority of lanes with
    1 <= |z| < 4 get a longer series of their own and those beyond the radius the recursion, both
    gathered and scattered back. Values agree with a single pass to rounding (tested).
    """
    if z.numel() == 0:
        return [torch.empty_like(z) for _ in range(top + 1)]
    eps = torch.finfo(z.dtype).eps
    abs_z = z.abs()
    large = (abs_z >= SERIES_RADIUS).nonzero(as_tuple=True)
    n_large = large[0].numel()
    if n_large == z.numel():
        return _chi_recursion(z, top)
    mid = ((abs_z >= _SERIES_BULK) & (abs_z < SERIES_RADIUS)).nonzero(as_tuple=True)
    if 2 * mid[0].numel() > z.numel():
        mid = None  # most lanes are mid-sized: one long pass is cheaper than gathering them
    excluded = [index for index, keep in ((large, n_large), (mid, mid is not None)) if keep]
    chis = _chi_series(z, top, eps, excluded)
    if mid is not None and mid[0].numel():
        for c, r in zip(chis, _chi_series(z[mid], top, eps)):
            c.index_put_(mid, r)
    if n_large:
        for c, r in zip(chis, _chi_recursion(z[large], top)):
            c.index_put_(large, r)
    return chis


class _Chi(torch.autograd.Function):
    """chi_0..chi_order with the closed-form derivative d chi_m/dz = chi_{m+1}."""

    @staticmethod
    def forward(ctx, z, order):
        values = _chi_values(z, order + 1)
        ctx.save_for_backward(*values[1:])
        outs = tuple(values[:order + 1])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        shifted = ctx.saved_tensors  # chi_1..chi_{order+1}
        grad_z = grads[0] * shifted[0]
        for g, c in zip(grads[1:], shifted[1:]):
            grad_z = grad_z.addcmul_(g, c)
        return grad_z, None


def chi(order, z):
    """(chi_0(z), ..., chi_order(z)), chi_m(z) = int_0^1 e^{z r} r^m dr, stable for every z <= 0.

    Differentiable once in z (d chi_m/dz = chi_{m+1}, closed form). fp16/bf16 are computed in fp32.
    """
    return _Chi.apply(z.to(_compute_dtype(z)), order)


def phi(k, z):
    """phi_k(z): phi_0 = e^z, phi_{k+1} = (phi_k - 1/k!)/z, phi_k(0) = 1/k!; stable for every z <= 0.

    phi_k(z) = int_0^1 e^{z r} (1-r)^{k-1}/(k-1)! dr, i.e. a binomial sum of chi_0..chi_{k-1}, whose
    terms do not cancel at large |z| (the chi_0 term dominates there).
    """
    z = z.to(_compute_dtype(z))
    if k == 0:
        return torch.exp(z)
    chis = chi(k - 1, z)
    out = chis[0] / math.factorial(k - 1)
    for i in range(1, k):
        out = out + ((-1) ** i * math.comb(k - 1, i) / math.factorial(k - 1)) * chis[i]
    return out


def lagrange_in_r(history):
    """Coefficients l[j][m] (Fractions) of the Lagrange basis on nodes r = 0..K, L_j(r) = sum_m l[j][m] r^m.

    Node r = j is the sample v_{t-j}; the hold rules integrate L_j against e^{z r} on [0, 1].
    """
    nodes = range(history + 1)
    rows = []
    for j in nodes:
        poly = [Fraction(1)]  # coefficients of prod_{i != j} (r - i)/(j - i), lowest power first
        for i in nodes:
            if i == j:
                continue
            scale = Fraction(1, j - i)
            shifted = [Fraction(0)] + poly  # r * poly
            poly = [(shifted[m] - i * (poly[m] if m < len(poly) else 0)) * scale for m in range(len(shifted))]
        rows.append(tuple(poly))
    return tuple(rows)


# ----------------------------------------------------------------------------------------------------
# Triton helpers: the same math on fp32 blocks of any shape.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def tl_chi(z):
    """(chi_0, .., chi_4) of an fp32 block; same regions as the torch `chi` (series |z| < 4)."""
    small = tl.abs(z) < 4.0
    x = tl.where(small, -z, 0.0)
    # S_4(x) = sum_{i<16} x^i 4!/(i+5)!, Horner from the tail; constants are (i+5)!/4!.
    s = 0.0 * x + 1.0 / 101370917007360000.0
    s = s * x + 1.0 / 5068545850368000.0
    s = s * x + 1.0 / 266765571072000.0
    s = s * x + 1.0 / 14820309504000.0
    s = s * x + 1.0 / 871782912000.0
    s = s * x + 1.0 / 54486432000.0
    s = s * x + 1.0 / 3632428800.0
    s = s * x + 1.0 / 259459200.0
    s = s * x + 1.0 / 19958400.0
    s = s * x + 1.0 / 1663200.0
    s = s * x + 1.0 / 151200.0
    s = s * x + 1.0 / 15120.0
    s = s * x + 1.0 / 1680.0
    s = s * x + 1.0 / 210.0
    s = s * x + 1.0 / 30.0
    s4 = s * x + 1.0 / 5.0
    s3 = (1.0 + x * s4) * 0.25
    s2 = (1.0 + x * s3) * (1.0 / 3.0)
    s1 = (1.0 + x * s2) * 0.5
    s0 = 1.0 + x * s1
    ez = tl.exp(z)
    rz = 1.0 / tl.where(small, -4.0, z)
    r0 = (ez - 1.0) * rz
    r1 = (ez - r0) * rz
    r2 = (ez - 2.0 * r1) * rz
    r3 = (ez - 3.0 * r2) * rz
    r4 = (ez - 4.0 * r3) * rz
    c0 = tl.where(small, ez * s0, r0)
    c1 = tl.where(small, ez * s1, r1)
    c2 = tl.where(small, ez * s2, r2)
    c3 = tl.where(small, ez * s3, r3)
    c4 = tl.where(small, ez * s4, r4)
    return c0, c1, c2, c3, c4


@triton.jit
def tl_phi(z):
    """(phi_1, phi_2, phi_3, phi_4) of an fp32 block, as binomial sums of chi (see `phi`)."""
    c0, c1, c2, c3, c4 = tl_chi(z)
    p1 = c0
    p2 = c0 - c1
    p3 = 0.5 * (c0 - 2.0 * c1 + c2)
    p4 = (1.0 / 6.0) * (c0 - 3.0 * c1 + 3.0 * c2 - c3)
    return p1, p2, p3, p4


@triton.jit
def _zoh_coeffs(z):
    zero = 0.0 * z
    return tl.exp(z), 1.0 + zero, zero, zero, zero


@triton.jit
def _zoh_coeffs_grad(z):
    zero = 0.0 * z
    ez = tl.exp(z)
    return ez, 1.0 + zero, zero, zero, zero, ez, zero, zero, zero, zero


# Hold rules: w_j = sum_m l[j][m] chi_m, dw_j = sum_m l[j][m] chi_{m+1}; l from `lagrange_in_r(K)`.
@triton.jit
def _foh_coeffs(z):
    c0, c1, c2, c3, c4 = tl_chi(z)
    zero = 0.0 * z
    return tl.exp(z), c0 - c1, c1, zero, zero


@triton.jit
def _foh_coeffs_grad(z):
    c0, c1, c2, c3, c4 = tl_chi(z)
    zero = 0.0 * z
    ez = tl.exp(z)
    return ez, c0 - c1, c1, zero, zero, ez, c1 - c2, c2, zero, zero


@triton.jit
def _poly_weights(c0, c1, c2):
    # L_0 = 1 - 3/2 r + 1/2 r^2, L_1 = 2 r - r^2, L_2 = -1/2 r + 1/2 r^2
    w0 = c0 - 1.5 * c1 + 0.5 * c2
    w1 = 2.0 * c1 - c2
    w2 = 0.5 * (c2 - c1)
    return w0, w1, w2


@triton.jit
def _poly_coeffs(z):
    c0, c1, c2, c3, c4 = tl_chi(z)
    w0, w1, w2 = _poly_weights(c0, c1, c2)
    return tl.exp(z), w0, w1, w2, 0.0 * z


@triton.jit
def _poly_coeffs_grad(z):
    c0, c1, c2, c3, c4 = tl_chi(z)
    w0, w1, w2 = _poly_weights(c0, c1, c2)
    d0, d1, d2 = _poly_weights(c1, c2, c3)
    zero = 0.0 * z
    ez = tl.exp(z)
    return ez, w0, w1, w2, zero, ez, d0, d1, d2, zero


@triton.jit
def _highorder_weights(c0, c1, c2, c3):
    # L_0 = 1 - 11/6 r + r^2 - 1/6 r^3, L_1 = 3 r - 5/2 r^2 + 1/2 r^3,
    # L_2 = -3/2 r + 2 r^2 - 1/2 r^3,   L_3 = 1/3 r - 1/2 r^2 + 1/6 r^3
    w0 = c0 - (11.0 / 6.0) * c1 + c2 - (1.0 / 6.0) * c3
    w1 = 3.0 * c1 - 2.5 * c2 + 0.5 * c3
    w2 = -1.5 * c1 + 2.0 * c2 - 0.5 * c3
    w3 = (1.0 / 3.0) * c1 - 0.5 * c2 + (1.0 / 6.0) * c3
    return w0, w1, w2, w3


@triton.jit
def _highorder_coeffs(z):
    c0, c1, c2, c3, c4 = tl_chi(z)
    w0, w1, w2, w3 = _highorder_weights(c0, c1, c2, c3)
    return tl.exp(z), w0, w1, w2, w3


@triton.jit
def _highorder_coeffs_grad(z):
    c0, c1, c2, c3, c4 = tl_chi(z)
    w0, w1, w2, w3 = _highorder_weights(c0, c1, c2, c3)
    d0, d1, d2, d3 = _highorder_weights(c1, c2, c3, c4)
    ez = tl.exp(z)
    return ez, w0, w1, w2, w3, ez, d0, d1, d2, d3


@triton.jit
def _bilinear_coeffs(z):
    q = 1.0 / (2.0 - z)
    zero = 0.0 * z
    return 4.0 * q - 1.0, 2.0 * q, zero, zero, zero


@triton.jit
def _bilinear_coeffs_grad(z):
    q = 1.0 / (2.0 - z)
    zero = 0.0 * z
    return 4.0 * q - 1.0, 2.0 * q, zero, zero, zero, 4.0 * q * q, 2.0 * q * q, zero, zero, zero


@triton.jit
def _rk4_coeffs(z):
    abar = 1.0 + z * (1.0 + z * (0.5 + z * ((1.0 / 6.0) + z * (1.0 / 24.0))))
    w0 = 0.5 + z * ((1.0 / 6.0) + z * (1.0 / 24.0))
    w1 = 0.5 + z * ((1.0 / 3.0) + z * (0.125 + z * (1.0 / 24.0)))
    zero = 0.0 * z
    return abar, w0, w1, zero, zero


@triton.jit
def _rk4_coeffs_grad(z):
    abar, w0, w1, w2, w3 = _rk4_coeffs(z)
    dabar = 1.0 + z * (1.0 + z * (0.5 + z * (1.0 / 6.0)))
    dw0 = (1.0 / 6.0) + z * (1.0 / 12.0)
    dw1 = (1.0 / 3.0) + z * (0.25 + z * 0.125)
    return abar, w0, w1, w2, w3, dabar, dw0, dw1, w2, w3


# ----------------------------------------------------------------------------------------------------
# The rules
# ----------------------------------------------------------------------------------------------------
class Discretizer:
    """One rule: Abar(z) and input weights w_j(z), once for torch and once as @triton.jit functions.

    A new rule subclasses this with `name`, `history`, `z_stable`, the torch methods `abar` and
    `input_weights` (differentiable in z), and the two jit functions (see docs/discretization.md); set
    `abar_is_exp = True` only if Abar(z) = e^z (the fused backward then skips recovering h_{t-1}).
    """
    name: str = ''
    history: int = 0          # K: the input term uses v_t .. v_{t-K} (0..MAX_HISTORY)
    z_stable = None           # most negative z with |Abar| <= 1 (None: stable for all z <= 0)
    clamp_default: bool = False
    # Abar = e^z, so dAbar/dz = Abar: the fused backward then needs no h_{t-1} (a cheaper scan)
    abar_is_exp: bool = False
    # @triton.jit (z fp32 block) -> (abar, w0, w1, w2, w3); unused weights = 0.0 * z
    tl_coeffs = None
    # @triton.jit (z) -> (abar, w0..w3, dabar, dw0..dw3): d/dz in closed form
    tl_coeffs_grad = None

    def __init__(self, clamp=None, z_clamp=None):
        if not 0 <= self.history <= MAX_HISTORY:
            raise ValueError(f'{type(self).__name__}.history={self.history} is outside 0..{MAX_HISTORY}')
        if clamp is None:
            clamp = self.clamp_default or z_clamp is not None
        if not clamp:
            if z_clamp is not None:
                raise ValueError('z_clamp was given with clamp=False')
            self.z_clamp = None
            return
        if z_clamp is None:
            z_clamp = self.z_stable
        if z_clamp is None:
            raise ValueError(f"rule '{self.name}' is stable for every z <= 0: pass z_clamp to clamp it")
        self.z_clamp = float(z_clamp)

    def abar(self, z):
        raise NotImplementedError(f'{type(self).__name__} must define abar(z)')

    def input_weights(self, z):
        raise NotImplementedError(f'{type(self).__name__} must define input_weights(z)')

    def clamp_z(self, z):
        """z' = max(z, z_clamp); the gradient is 0 where z < z_clamp (torch.clamp's rule)."""
        if self.z_clamp is None:
            return z
        return torch.clamp(z, min=self.z_clamp)

    def __repr__(self):
        return f'{type(self).__name__}(name={self.name!r}, history={self.history}, z_clamp={self.z_clamp})'


class ZOH(Discretizer):
    """Mamba's rule (selective_scan_ref): Abar = e^z, input delta * B u (w_0 = 1, not phi_1)."""
    name = 'zoh'
    history = 0
    abar_is_exp = True
    tl_coeffs = _zoh_coeffs
    tl_coeffs_grad = _zoh_coeffs_grad

    def abar(self, z):
        return torch.exp(z.to(_compute_dtype(z)))

    def input_weights(self, z):
        return (torch.ones_like(z, dtype=_compute_dtype(z)),)


class ExponentialHold(Discretizer):
    """Exact integration of the degree-K polynomial through v_{t-K}..v_t: Abar = e^z, sum_j w_j = phi_1."""
    abar_is_exp = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.lagrange = tuple(tuple(float(c) for c in row) for row in lagrange_in_r(cls.history))

    def abar(self, z):
        return torch.exp(z.to(_compute_dtype(z)))

    def input_weights(self, z):
        chis = chi(self.history, z)
        weights = []
        for row in self.lagrange:
            terms = [(coef, c) for coef, c in zip(row, chis) if coef != 0.0]
            w = terms[0][0] * terms[0][1]
            for coef, c in terms[1:]:
                w = torch.add(w, c, alpha=coef)
            weights.append(w)
        return tuple(weights)


class FOH(ExponentialHold):
    """First-order hold: w_0 = phi_2, w_1 = phi_1 - phi_2."""
    name = 'foh'
    history = 1
    tl_coeffs = _foh_coeffs
    tl_coeffs_grad = _foh_coeffs_grad


class Poly(ExponentialHold):
    """Quadratic through v_{t-2}, v_{t-1}, v_t: w_2 = phi_3 - phi_2/2, w_1 = phi_1 - 2 phi_3, w_0 = phi_3 + phi_2/2."""
    name = 'poly'
    history = 2
    tl_coeffs = _poly_coeffs
    tl_coeffs_grad = _poly_coeffs_grad


class HighOrder(ExponentialHold):
    """Cubic through v_{t-3}..v_t; at z = 0 the Adams-Moulton weights (9, 19, -5, 1)/24."""
    name = 'highorder'
    history = 3
    tl_coeffs = _highorder_coeffs
    tl_coeffs_grad = _highorder_coeffs_grad


class Bilinear(Discretizer):
    """Tustin: Abar = (1 + z/2)/(1 - z/2) in (-1, 1] (negative below z = -2), w_0 = 1/(1 - z/2)."""
    name = 'bilinear'
    history = 0
    tl_coeffs = _bilinear_coeffs
    tl_coeffs_grad = _bilinear_coeffs_grad

    def abar(self, z):
        # (2 + z)/(2 - z) written as 4/(2 - z) - 1: autograd's quotient rule on the first form cancels
        # at large |z| (two ~1/z terms leaving 4/z^2), this one differentiates to 4/(2 - z)^2 directly.
        z = z.to(_compute_dtype(z))
        return 4.0 / (2.0 - z) - 1.0

    def input_weights(self, z):
        z = z.to(_compute_dtype(z))
        return (2.0 / (2.0 - z),)


def _rk4_stability_bound():
    """The real root of 1 + z/2 + z^2/6 + z^3/24 = 0, i.e. Abar(z) = 1 with z < 0 (Newton, float64)."""
    z = -2.8
    for _ in range(50):
        f = 24.0 + 12.0 * z + 4.0 * z * z + z ** 3
        z -= f / (12.0 + 8.0 * z + 3.0 * z * z)
    return z


class RK4(Discretizer):
    """Classical RK4 on h' = a h + v(s), v linear between samples; Abar = the degree-4 Taylor of e^z.

    Abar > 0 for every real z (minimum 0.27 at z = -1.60) and exceeds 1 below z_stable = -2.7853,
    so the clamp is on by default.
    """
    name = 'rk4'
    history = 1
    z_stable = _rk4_stability_bound()
    clamp_default = True
    tl_coeffs = _rk4_coeffs
    tl_coeffs_grad = _rk4_coeffs_grad

    def abar(self, z):
        z = z.to(_compute_dtype(z))
        return 1.0 + z * (1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0))))

    def input_weights(self, z):
        z = z.to(_compute_dtype(z))
        w0 = 0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0))
        w1 = 0.5 + z * (1.0 / 3.0 + z * (0.125 + z * (1.0 / 24.0)))
        return w0, w1


RULES = {cls.name: cls for cls in (ZOH, FOH, Bilinear, Poly, HighOrder, RK4)}


def get_discretizer(rule):
    """A Discretizer from a registered name, a Discretizer subclass, or an instance (returned as is)."""
    if isinstance(rule, Discretizer):
        return rule
    if isinstance(rule, type) and issubclass(rule, Discretizer):
        return rule()
    if isinstance(rule, str) and rule in RULES:
        return RULES[rule]()
    raise ValueError(f'unknown discretization {rule!r}; valid names: {", ".join(sorted(RULES))}')
