"""The Vim backbone on CUDA through the fused kernels (add + RMSNorm, both directions' conv + SiLU in one launch,
both scans in one launch) against the same backbone through the torch references on the GPU: output and every
parameter gradient, fp32; and a bf16-autocast step close to the fp32 one. (Every rule's fused kernels are
checked against float64 in tests/gpu/test_scan_gpu.py and, through the mixer, on CPU in tests/models.)
"""
import pytest
import torch

from projects.vim_disc.models import VimBackbone

pytestmark = pytest.mark.gpu


def run(model, x, monkeypatch, mode, dtype=None):
    for var in ('VIM_DISC_SCAN', 'VIM_DISC_CONV', 'VIM_DISC_NORM'):
        value = '' if mode == 'fused' else ('parallel' if var == 'VIM_DISC_SCAN' else 'ref')
        monkeypatch.setenv(var, value)
    model.zero_grad()
    with torch.autocast('cuda', dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x)[0]
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


# the benchmark's shapes (Vim-T width, 1024 px: L = 4096, eight 512-step tiles per row), so the kernels are the
# ones the benchmarks time; zoh (2-tuple backward) and foh (history lags across tiles)
@pytest.mark.parametrize('rule', ['zoh', 'foh'])
def test_fused_backbone_matches_the_torch_path(rule, monkeypatch):
    torch.manual_seed(0)
    model = VimBackbone(arch=dict(embed_dims=192, depth=2), img_size=1024, discretization=rule,
                        cuda_graph=False).cuda().train()
    x = torch.randn(2, 3, 1024, 1024, device='cuda')
    fused, fused_grads = run(model, x, monkeypatch, 'fused')
    ref, ref_grads = run(model, x, monkeypatch, 'ref')
    torch.testing.assert_close(fused, ref, rtol=1e-3, atol=1e-4)
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp(min=1e-12)
        err = (fused_grads[name] - g).abs().max() / scale
        assert err < 2e-3, f'{name}: max error {err:.2e} of the gradient\'s scale'


def test_bf16_autocast_step_close_to_fp32(monkeypatch):
    torch.manual_seed(0)
    model = VimBackbone(arch='tiny', img_size=1024, cuda_graph=False).cuda().train()
    model.layers = model.layers[:4]
    x = torch.randn(2, 3, 1024, 1024, device='cuda')
    out32, g32 = run(model, x, monkeypatch, 'fused')
    out16, g16 = run(model, x, monkeypatch, 'fused', torch.bfloat16)
    assert ((out16 - out32).norm() / out32.norm()) < 2e-2
    for name, g in g32.items():
        assert ((g16[name] - g).norm() / g.norm().clamp(min=1e-12)) < 0.1, name
