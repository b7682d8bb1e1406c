"""The reference: Vim's per-direction depthwise conv1d + SiLU in plain torch (F.conv1d), autograd by torch.

Direction 0 is the causal conv; direction 1 the causal conv of the time-flipped sequence read back in original
order, i.e. an anti-causal conv with the kernel reversed. Computed in fp32 with autocast off (as the Triton
kernels compute), the output cast to x's dtype; float64 stays float64.
"""
import torch
import torch.nn.functional as F


def depthwise_conv1d_silu_ref(x, weight, bias=None, activation='silu'):
    """x (batch, dim, L), weight (R, dim, K), bias (R, dim) or None -> out (batch, R, dim, L) contiguous:
        out[:, 0, d, t] = act(bias[0, d] + sum_k weight[0, d, k] x[:, d, t - K + 1 + k])
        out[:, 1, d, t] = act(bias[1, d] + sum_k weight[1, d, K - 1 - k] x[:, d, t + k])   (x = 0 outside [0, L))
    """
    from .interface import check_inputs
    check_inputs(x, weight, bias, activation)
    R, dim, K = weight.shape
    L = x.shape[-1]
    ctype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc, w = x.to(ctype), weight.to(ctype)
        b = bias.to(ctype) if bias is not None else None
        outs = [F.conv1d(xc, w[0, :, None], b[0] if b is not None else None, padding=K - 1, groups=dim)[..., :L]]
        if R == 2:
            outs.append(F.conv1d(xc, w[1].flip(-1)[:, None], b[1] if b is not None else None, padding=K - 1,
                                 groups=dim)[..., K - 1:K - 1 + L])
        out = torch.stack(outs, dim=1)
        if activation == 'silu':
            out = F.silu(out)
    return out.to(x.dtype)
