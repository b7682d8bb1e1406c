"""The fused Triton selective scan on CUDA: every rule against the float64 reference, fp16/bf16, reverse and
constant B/C, stability at large steps, the deterministic backward, memory (no (batch, dim, L, N) tensor), and
zoh against mamba-ssm's CUDA kernel when built (tests/gpu/test_mamba_grid.py has mamba's whole test grid).

Runs on the GPU machine (skipped without CUDA). mamba-ssm's extension is looked up as an importable
`selective_scan_cuda` or built from the sdist named by MAMBA_SCAN_SRC into MAMBA_SCAN_BUILD_DIR
(benchmarks/benchmark_scan.py builds it); without either those tests skip.
"""
import os

import pytest
import torch

from kernels.discretization import RULES, get_discretizer
from kernels.parallel import selective_scan_parallel
from kernels.scan import ScanConfig, selective_scan_fn, selective_scan_triton
from kernels.scan.interface import _torch_scan
from tests.kernels.user_rules import ForwardEuler

pytestmark = pytest.mark.gpu

TOL = {torch.float32: (6e-4, 2e-3), torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}
# many programs, several tiles with short ones, 2-channel blocks, groups
SMALL = ScanConfig(tile_l=16, block_d=2, block_d_bwd=2, num_warps=2, num_warps_bwd=2)


def make_inputs(batch, dim, L, N, dtype, groups=0, delta_scale=1.0, seed=0, constant=''):
    g = torch.Generator(device='cuda').manual_seed(seed)
    kw = dict(device='cuda', generator=g)
    u = torch.randn(batch, dim, L, **kw).to(dtype)
    delta = (torch.randn(batch, dim, L, **kw) * delta_scale).to(dtype)
    A = -(torch.rand(dim, N, **kw) * 2.0 + 0.2)
    shape = (batch, N, L) if not groups else (batch, groups, N, L)
    B = torch.randn(dim, N, **kw) if 'B' in constant else torch.randn(*shape, **kw).to(dtype)
    C = torch.randn(dim, N, **kw) if 'C' in constant else torch.randn(*shape, **kw).to(dtype)
    D = torch.randn(dim, **kw)
    z = torch.randn(batch, dim, L, **kw).to(dtype)
    bias = torch.randn(dim, **kw) * 0.5
    return [u, delta, A, B, C, D, z, bias]


def reference(*args, **kwargs):
    """float64 on the GPU: the parallel torch scan (same math as the sequential oracle, tested against it)."""
    return _torch_scan(selective_scan_parallel, *args, **kwargs)


def compare(inputs, rule, dtype, config=None, last_state=True, reverse=False, deterministic=False):
    """Triton (inputs as given) vs the float64 reference on the same rounded inputs; every gradient."""
    ours = [x.detach().clone().requires_grad_() for x in inputs]
    ref = [x.detach().double().requires_grad_() for x in inputs]
    out = selective_scan_triton(*ours, delta_softplus=True, return_last_state=last_state, discretization=rule,
                                reverse=reverse, deterministic=deterministic, config=config)
    out_ref = reference(*ref, True, last_state, rule, reverse=reverse)
    outs, outs_ref = (out, out_ref) if last_state else ((out,), (out_ref,))
    assert outs[0].dtype == inputs[0].dtype
    grads = [torch.randn_like(o).to(ours_o.dtype).double() for o, ours_o in zip(outs_ref, outs)]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(grads, outs)])
    torch.autograd.backward(outs_ref, grads)
    rtol, atol = TOL[dtype]
    names = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias']
    checks = [('out', outs[0], outs_ref[0])]
    if last_state:
        checks.append(('last_state', outs[1], outs_ref[1]))
    checks += [('d' + n, x.grad, r.grad) for n, x, r in zip(names, ours, ref)]
    for name, got, want in checks:
        assert got is not None and torch.isfinite(got).all(), name
        assert got.shape == want.shape and got.dtype != torch.float64, name
        # mamba-ssm's tests: d delta accumulates the most rounding
        scale = (5, 10) if name == 'ddelta' and dtype != torch.float32 else (1, 1)
        torch.testing.assert_close(got.double(), want, rtol=rtol * scale[0], atol=atol * scale[1],
                                   msg=lambda m, name=name: f'{name}: {m}')
    return ours


def _rule(name):
    return ForwardEuler() if name == 'euler' else get_discretizer(name)


@pytest.mark.parametrize('reverse', [False, True], ids=['fwd', 'rev'])
@pytest.mark.parametrize('rule', sorted(RULES) + ['euler'])
def test_fp32_default_launch(rule, reverse):
    """The launch the backbone gets, odd sizes, both scan directions."""
    scale = 0.3 if rule == 'euler' else 1.0  # forward Euler is only stable for z >= -2
    inputs = make_inputs(2, 37, 701, 16, torch.float32, delta_scale=scale)
    if rule == 'euler':
        inputs[7] = inputs[7] - 3.0
    compare(inputs, _rule(rule), torch.float32, reverse=reverse)


@pytest.mark.parametrize('constant', ['', 'B', 'C', 'BC'])
@pytest.mark.parametrize('rule', ['zoh', 'foh', 'highorder', 'rk4'])
def test_fp32_small_launch_grouped_and_constant(rule, constant):
    compare(make_inputs(3, 12, 203, 5, torch.float32, groups=2, constant=constant), _rule(rule), torch.float32,
            config=SMALL, reverse=constant == 'C')


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('rule', ['zoh', 'foh', 'bilinear', 'highorder'])
def test_half_precision(rule, dtype):
    """fp16/bf16 in and out, fp32 state and sums: within mamba-ssm's tolerances of float64."""
    compare(make_inputs(2, 24, 333, 16, dtype), _rule(rule), dtype, last_state=False)


@pytest.mark.parametrize('rule', sorted(RULES))
def test_large_steps_stay_finite(rule):
    """delta up to ~1e3 (z down to -1e4 after softplus): finite outputs and gradients, state bounded."""
    inputs = make_inputs(1, 8, 257, 16, torch.float32, delta_scale=300.0)
    leaves = [x.clone().requires_grad_() for x in inputs]
    out, last = selective_scan_triton(*leaves, delta_softplus=True, return_last_state=True, discretization=rule)
    (out.sum() + last.sum()).backward()
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize('rule', ['zoh', 'poly', 'bilinear'])
def test_deterministic_backward(rule):
    """deterministic=True: bitwise repeatable, and equal to the atomic backward within fp32 rounding."""
    inputs = make_inputs(2, 48, 300, 16, torch.float32)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the same upstream gradients
        runs.append(compare(inputs, _rule(rule), torch.float32, deterministic=True))
    names = ['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias']
    for name, a, b in zip(names, *runs):
        assert torch.equal(a.grad, b.grad), f'd{name} differs between two deterministic runs'
    torch.manual_seed(0)
    atomic = compare(inputs, _rule(rule), torch.float32, deterministic=False)
    for name, a, b in zip(names, runs[0], atomic):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f'd{n}: {m}')


def test_no_state_tensor_saved_or_built():
    """Peak memory of forward+backward stays below a quarter of one (batch, dim, L, N) fp32 tensor: building
    it (or saving it) would alone exceed the bound."""
    batch, dim, L, N = 2, 256, 4096, 16
    inputs = make_inputs(batch, dim, L, N, torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in inputs]
    dout = torch.randn_like(inputs[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    selective_scan_fn(*leaves, delta_softplus=True, discretization='highorder').backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    state_tensor = batch * dim * L * N * 4
    assert extra < state_tensor / 4, (extra, state_tensor)


def mamba_module():
    try:
        import selective_scan_cuda
        return selective_scan_cuda
    except ImportError:
        pass
    src, build = os.environ.get('MAMBA_SCAN_SRC'), os.environ.get('MAMBA_SCAN_BUILD_DIR')
    if not src or not build:
        return None
    from tests.benchmarks import import_benchmark
    load_mamba_scan = import_benchmark('benchmark_scan').load_mamba_scan
    return load_mamba_scan(src, build)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_zoh_matches_mamba_cuda(dtype):
    module = mamba_module()
    if module is None:
        pytest.skip('mamba-ssm CUDA selective_scan not importable (set MAMBA_SCAN_SRC and MAMBA_SCAN_BUILD_DIR)')
    from tests.benchmarks import import_benchmark
    mamba_scan = import_benchmark('benchmark_scan').mamba_scan
    inputs = make_inputs(2, 64, 1000, 16, dtype)
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    out = selective_scan_fn(*ours, delta_softplus=True)
    out_m = mamba_scan(module)(*theirs, delta_softplus=True)
    dout = torch.randn_like(out)
    out.backward(dout)
    out_m.backward(dout)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, out_m, rtol=rtol, atol=atol)
    for name, x, y in zip(['u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias'], ours, theirs):
        scale = (5, 10) if name == 'delta' and dtype != torch.float32 else (1, 1)
        torch.testing.assert_close(x.grad.float(), y.grad.float(), rtol=rtol * scale[0], atol=atol * scale[1] *
                                   max(1.0, y.grad.abs().max().item() / 100), msg=lambda m, n=name: f'd{n}: {m}')
