"""The CPU training path: the selective scan with every per-step quantity computed at once over L.

Only the first-order recurrence h_t = Abar_t h_{t-1} + b_t is left sequential, and it runs inside one
autograd.Function on (L, batch, dim, N) time-major buffers: one fused addcmul per step forward, the
adjoint recurrence g_t = dh_t + Abar_{t+1} g_{t+1} backward, no autograd graph per step. On 2 cores
this beat a Hillis-Steele doubling scan (log2 L passes over the whole buffer) at every size measured:
the per-step slices stay in cache while each doubling pass streams all of memory (docs/discretization.md,
"CPU path"). Works for negative Abar (bilinear) since nothing goes through log-space.
"""
import torch
import torch.nn.functional as F

from .discretization import get_discretizer
from .naive import prepare_step


class _LinearRecurrence(torch.autograd.Function):
    """h_t = a_t h_{t-1} + b_t along dim 0, h_{-1} = 0."""

    @staticmethod
    def forward(ctx, a, b):
        a = a.contiguous()
        h = torch.empty_like(b, memory_format=torch.contiguous_format)
        h[0] = b[0]
        for t in range(1, b.shape[0]):
            torch.addcmul(b[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h = ctx.saved_tensors
        grad_h = grad_h.contiguous()
        # Adjoint: g_t = dL/dh_t + a_{t+1} g_{t+1}; then db_t = g_t and da_t = g_t h_{t-1}.
        g = torch.empty_like(grad_h)
        g[-1] = grad_h[-1]
        for t in range(grad_h.shape[0] - 2, -1, -1):
            torch.addcmul(grad_h[t], a[t + 1], g[t + 1], out=g[t])
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(g)
            grad_a[0] = 0.0
            torch.mul(g[1:], h[:-1], out=grad_a[1:])
        return grad_a, g if ctx.needs_input_grad[1] else None


def linear_recurrence(a, b):
    """h_t = a_t h_{t-1} + b_t over dim 0 (time-major), h_{-1} = 0; differentiable in a and b."""
    return _LinearRecurrence.apply(a, b)


def _grouped(BC, dim):
    """(batch, N, L) or (batch, G, N, L) -> (batch, G, N, L); channel d reads group d // (dim // G)."""
    if BC.dim() == 3:
        BC = BC[:, None]
    if BC.dim() != 4 or dim % BC.shape[1]:
        raise ValueError(f'B/C must be (batch, N, L) or (batch, G, N, L) with G dividing dim={dim}, '
                         f'got {tuple(BC.shape)}')
    return BC


def selective_scan_parallel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False, discretization='zoh'):
    """Same arguments, semantics and returns as `kernels.naive.selective_scan_ref`, fast on CPU.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias:
    (dim,); z: (batch, dim, L). fp32 state (float64 for float64 inputs); out in u's dtype
    [, last_state (batch, dim, N)].
    """
    rule = get_discretizer(discretization)
    dtype_in = u.dtype
    ctype, u, delta = prepare_step(u, delta, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    n_state = A.shape[1]
    B4, C4 = _grouped(B.to(ctype), dim), _grouped(C.to(ctype), dim)  # (batch, G, N, L)

    # Time-major (L, batch, dim, N): each step of the recurrence is one contiguous slice.
    delta_t = delta.permute(2, 0, 1)[..., None]  # (L, batch, dim, 1)
    zA = rule.clamp_z(delta_t * A.to(ctype))
    abar = rule.abar(zA)
    weights = rule.input_weights(zA)
    # v_t = B_t u_t per channel, the group axis split out of dim.
    v = torch.einsum('bghl,bgnl->lbghn', u.reshape(batch, B4.shape[1], -1, length), B4)
    v = v.reshape(length, batch, dim, n_state)
    mix = weights[0] * v
    for j in range(1, min(rule.history, length - 1) + 1):
        mix = mix + weights[j] * F.pad(v[:-j], (0, 0, 0, 0, 0, 0, j, 0))  # v_{t-j}, zero before t = 0
    h = linear_recurrence(abar, delta_t * mix)

    y = torch.einsum('lbghn,bgnl->bghl', h.view(length, batch, C4.shape[1], -1, n_state), C4)
    y = y.reshape(batch, dim, length)
    out = y if D is None else y + u * D.to(ctype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ctype))
    out = out.to(dtype=dtype_in)
    return (out, h[-1]) if return_last_state else out
