"""The oracle: a plain sequential PyTorch selective scan, exact in float64, autograd for gradients.

Written for clarity, after mamba-ssm's ``selective_scan_ref``; with discretization='zoh' it is that
function (same operations in the same order, so fp32 results agree bit for bit).
"""
import torch
import torch.nn.functional as F

from .discretization import get_discretizer


def _per_channel(BC, dim):
    """(batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim // G); 3-d passes through."""
    if BC.dim() == 3:
        return BC
    if BC.dim() != 4 or dim % BC.shape[1]:
        raise ValueError(f'B/C must be (batch, N, L) or (batch, G, N, L) with G dividing dim={dim}, '
                         f'got {tuple(BC.shape)}')
    return BC.repeat_interleave(dim // BC.shape[1], dim=1)


def _shift(v, j):
    """v_{t-j} along the L axis (dim 2) with zeros before t = 0."""
    if j == 0:
        return v
    return F.pad(v[:, :, :-j], (0, 0, j, 0)) if v.shape[2] > j else torch.zeros_like(v)


def prepare_step(u, delta, delta_bias=None, delta_softplus=False):
    """(compute dtype, u, delta_t): float64 stays float64, everything else computes in fp32; the bias and
    softplus are applied here so every torch path derives delta_t the same way."""
    ctype = torch.float64 if u.dtype == torch.float64 else torch.float32
    delta = delta.to(ctype)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(ctype)
    if delta_softplus:
        delta = F.softplus(delta)
    return ctype, u.to(ctype), delta


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, discretization='zoh'):
    """h_t = Abar(z_t) h_{t-1} + delta_t sum_j w_j(z_t) B_t u_{t-j},  y_t = C_t h_t + D u_t  [* silu(z)].

    u, delta: (batch, dim, L); A: (dim, N) real (negative); B, C: (batch, N, L) or grouped
    (batch, G, N, L); D, delta_bias: (dim,); z: (batch, dim, L). z_t = delta_t A after the rule's clamp.
    Computes in float64 for float64 inputs, else fp32. Returns out (batch, dim, L) in u's dtype
    [, last_state (batch, dim, N) in the compute dtype].
    """
    rule = get_discretizer(discretization)
    dtype_in = u.dtype
    ctype, u, delta = prepare_step(u, delta, delta_bias, delta_softplus)
    batch, dim, length = u.shape
    if A.is_complex():
        raise ValueError('complex A is not supported: the rules are defined for real z <= 0')
    A, B, C = A.to(ctype), B.to(ctype), C.to(ctype)
    B, C = _per_channel(B, dim), _per_channel(C, dim)

    zA = rule.clamp_z(torch.einsum('bdl,dn->bdln', delta, A))
    deltaA = rule.abar(zA)
    weights = rule.input_weights(zA)
    if B.dim() == 3:
        deltaB_u = torch.einsum('bdl,bnl,bdl->bdln', delta, B, u)
        B_u = torch.einsum('bnl,bdl->bdln', B, u) if rule.history else None
    else:
        deltaB_u = torch.einsum('bdl,bdnl,bdl->bdln', delta, B, u)
        B_u = torch.einsum('bdnl,bdl->bdln', B, u) if rule.history else None
    # The j = 0 term as delta*B*u keeps zoh bit-identical to mamba's reference; older samples are
    # weighted by the current step's delta_t (the rule integrates over the step ending at t).
    drive = weights[0] * deltaB_u
    for j in range(1, rule.history + 1):
        drive = drive + delta[..., None] * weights[j] * _shift(B_u, j)

    x = deltaA.new_zeros((batch, dim, A.shape[1]))
    ys = []
    for i in range(length):
        x = deltaA[:, :, i] * x + drive[:, :, i]
        if C.dim() == 3:
            y = torch.einsum('bdn,bn->bd', x, C[:, :, i])
        else:
            y = torch.einsum('bdn,bdn->bd', x, C[:, :, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D.to(ctype)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ctype))
    out = out.to(dtype=dtype_in)
    return (out, x) if return_last_state else out
