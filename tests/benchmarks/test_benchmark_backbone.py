"""benchmarks/: the backbone benchmark's mamba provider on CPU, and every script's --help (imports after the move).

mamba-ssm's CUDA kernel rejects u/delta/z/B/C whose last stride is not 1 (the first mamba provider crashed on
the strided gate z the mixer passed). FakeMambaScan stands in for the built `selective_scan_cuda` module: the
same fwd/bwd calls benchmark_scan.MambaCudaScanFn makes, computed by the repo's CPU scan, with the same checks.
"""
import glob
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import projects.vim_disc.models.vim as vim_module
from kernels import bidirectional_selective_scan, selective_scan_fn
from projects.vim_disc.models import VimBackbone
from tests.benchmarks import BENCHMARKS, import_benchmark

bench = import_benchmark('benchmark_backbone')


class FakeMambaScan:
    """`selective_scan_cuda`'s fwd/bwd on kernels.selective_scan_fn (CPU), raising like mamba's kernel."""

    def __init__(self):
        self.calls = dict(fwd=0, bwd=0)

    @staticmethod
    def check_strides(**tensors):
        for name, x in tensors.items():
            if x is not None and x.stride(-1) != 1 and x.size(-1) != 1:
                raise RuntimeError(f'Expected {name}.stride(-1) == 1 to be true, but got false.')

    def fwd(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        self.check_strides(u=u, delta=delta, z=z, B=B, C=C)
        self.calls['fwd'] += 1
        out = selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        x = torch.empty(0)  # mamba's saved chunk states: unused by this bwd
        return (out, x) if z is None else (out, x, out * F.silu(z))

    def bwd(self, u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
        self.check_strides(u=u, delta=delta, z=z, B=B, C=C, dout=dout)
        self.calls['bwd'] += 1
        leaves = [t.detach().requires_grad_() if t is not None else None
                  for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            y = selective_scan_fn(*leaves[:7], delta_bias=leaves[7], delta_softplus=delta_softplus)
            present = [t for t in leaves if t is not None]
            grads = iter(torch.autograd.grad(y, present, dout))
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = (next(grads) if t is not None else None for t in leaves)
        return (du, ddelta, dA, dB, dC, dD, ddelta_bias) + ((dz, ) if z is not None else ())


def scan_inputs(batch=2, dim=6, L=9, N=4, strided=False, seed=0):
    """bidirectional_selective_scan's inputs; strided: u, delta, z, B, C as views whose last stride is not 1."""
    g = torch.Generator().manual_seed(seed)

    def seq(*shape):  # (..., L) with time innermost, or a permuted view with time outermost in memory
        if not strided:
            return torch.randn(*shape, generator=g)
        return torch.randn(shape[-1], *shape[:-1], generator=g).permute(*range(1, len(shape)), 0)

    u, delta = seq(batch, 2, dim, L), 0.5 * seq(batch, 2, dim, L)
    B, C, z = seq(batch, 2, N, L), seq(batch, 2, N, L), seq(batch, dim, L)
    A = -torch.rand(2, dim, N, generator=g) - 0.5
    D, bias = torch.randn(2, dim, generator=g), 0.1 * torch.rand(2, dim, generator=g)
    return [u, delta, A, B, C, D, z, bias]


def run_scan(fn, inputs):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    u, delta, A, B, C, D, z, bias = leaves
    out = fn(u, delta, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True, discretization='zoh')
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), [x.grad for x in leaves]


def test_fake_rejects_a_strided_z_as_mambas_kernel_does():
    """Without this the regression test below could not fail: the fake must refuse what mamba refuses."""
    fake = FakeMambaScan()
    u, delta, A, B, C, D, z, bias = [x[:, 0] if x.dim() == 4 else x for x in scan_inputs()]
    A, D, bias = A[0], D[0], bias[0]
    B4, C4 = B[:, None], C[:, None]  # MambaCudaScanFn hands mamba time-varying B/C with a group axis
    out, _, out_z = fake.fwd(u, delta, A, B4, C4, D, z, bias, True)
    assert torch.allclose(out_z, selective_scan_fn(u, delta, A, B, C, D, z, bias, True))
    z_strided = z.transpose(1, 2).contiguous().transpose(1, 2)
    assert z_strided.stride(-1) != 1 and torch.equal(z_strided, z)
    with pytest.raises(RuntimeError, match=r'z\.stride\(-1\) == 1'):
        fake.fwd(u, delta, A, B4, C4, D, z_strided, bias, True)
    # the scan benchmark's wrapper passes its inputs through as they are: a strided z reaches the kernel
    with pytest.raises(RuntimeError, match=r'z\.stride\(-1\) == 1'):
        bench.mamba_scan(fake)(u, delta, A, B, C, D, z_strided, bias, True)


@pytest.mark.parametrize('strided', [False, True], ids=['contiguous', 'strided'])
def test_mamba_provider_matches_ours(strided):
    """The provider (two forward scans, the second on flipped copies) equals our bidirectional scan, values
    and every gradient, also when every sequence input is a view with a non-unit last stride."""
    inputs = scan_inputs(strided=strided)
    if strided:
        assert all(x.stride(-1) != 1 for x in (inputs[0], inputs[1], inputs[3], inputs[4], inputs[6]))
    fake = FakeMambaScan()
    out, grads = run_scan(bench.mamba_bidirectional(fake), inputs)
    ref_out, ref_grads = run_scan(bidirectional_selective_scan, inputs)
    assert fake.calls == dict(fwd=2, bwd=2)
    assert out.shape == ref_out.shape == inputs[0].shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g, ref in zip(('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias'), grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f'd{name}: {m}')


def test_mamba_provider_refuses_other_rules():
    u, delta, A, B, C, D, z, bias = scan_inputs()
    with pytest.raises(ValueError, match='zoh only'):
        bench.mamba_bidirectional(FakeMambaScan())(u, delta, A, B, C, D, z=z, delta_bias=bias, discretization='foh')


def backbone_step(provider, fake, state, x):
    bench.use_provider(provider, fake)
    model = VimBackbone(arch=dict(embed_dims=16, depth=2), img_size=32)
    model.load_state_dict(state)
    out = model(x)[0]
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_backbone_on_the_mamba_provider_matches_the_default_path(monkeypatch):
    """A tiny VimBackbone forward + backward with use_provider('mamba', fake) equals the 'parallel' provider."""
    assert bench.DEFAULT_SCAN is not None, 'vim.py has no module-level bidirectional_selective_scan'
    monkeypatch.setattr(vim_module, 'bidirectional_selective_scan', vim_module.bidirectional_selective_scan)
    # use_provider sets it. setenv, not delenv(raising=False): that records nothing when the variable is unset, so
    # 'parallel' leaked into every later test and its subprocesses (the torch scan instead of the default path)
    monkeypatch.setenv('VIM_DISC_SCAN', '')
    torch.manual_seed(0)
    state = VimBackbone(arch=dict(embed_dims=16, depth=2), img_size=32).state_dict()
    x = torch.randn(2, 3, 32, 32)
    fake = FakeMambaScan()
    out, grads = backbone_step('mamba', fake, state, x)
    assert fake.calls == dict(fwd=4, bwd=4), fake.calls  # one call per direction and layer (depth 2)
    ref_out, ref_grads = backbone_step('parallel', None, state, x)
    assert os.environ.get('VIM_DISC_SCAN') == 'parallel' and fake.calls == dict(fwd=4, bwd=4)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f'{name}: {m}')


SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(BENCHMARKS, 'benchmark_*.py')))


def test_the_benchmarks_are_all_here():
    assert SCRIPTS == [f'benchmark_{n}.py' for n in
                       ('backbone', 'cpu_scan', 'ddp', 'pipeline', 'polygon_crop', 'resume', 'scan', 'train')]


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_runs_from_any_directory(script, tmp_path):
    """python benchmarks/<script> --help from outside the repo: the bootstrap and every import resolve."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    res = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), '--help'], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'usage:' in res.stdout
