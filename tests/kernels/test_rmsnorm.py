"""The fused residual add + RMSNorm (kernels/rmsnorm) against its torch reference, on CPU through
TRITON_INTERPRET=1; the reference against the un-fused formula; the checks; an sm_90a compile of both kernels.

Every case runs forward and backward of both on the same inputs and the same random upstream gradients (for
normed and for residual_out) and compares normed, residual_out, d hidden, d residual and d weight. Freshly
allocated buffers are NaN, so an element or a d weight partial that a kernel forgets to write fails the
check. C = 192 at L = 130 spans several token blocks with a short last one; `small_tiles` forces that for the
other widths. Races, bf16 rounding on the card and CUDA-graph capture are left to tests/gpu/test_rmsnorm_gpu.py.
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.rmsnorm import add_rms_norm, add_rms_norm_ref, add_rms_norm_triton, interface
from tests.kernels.compile_child import compiled_lines, needs_ptxas

TIGHT = dict(rtol=1e-5, atol=1e-5)
LOOSE = dict(rtol=2e-2, atol=2e-2)  # bf16 outputs: one rounding each, which may land one ulp apart


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Freshly allocated buffers hold NaN, so an element a kernel forgets to write fails the check."""
    empty = torch.empty

    def nan_empty_(*a, **k):
        t = empty(*a, **k)
        return t.fill_(float('nan')) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty', nan_empty_)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 8 tokens whatever C: many token blocks per row, a short last one."""
    monkeypatch.setattr(interface, 'TILE_ELEMENTS', 8)
    monkeypatch.setattr(interface, 'MIN_BLOCK_L', 8)


def make_inputs(batch, C, L, hidden_dtype=torch.float32, residual=True, scale=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, C, L, generator=g).to(hidden_dtype)
    res = torch.randn(batch, C, L, generator=g) * 2.0 if residual else None
    weight = 1.0 + 0.5 * torch.randn(C, generator=g)
    # DropPath's factor mask / keep_prob: a dropped sample (0) first
    sc = torch.tensor([0.0, 1.25, 1.25, 1.25][:batch]) if scale else None
    return hidden, res, weight, sc


def run_both(hidden, residual, weight, scale, out_dtype=None, eps=1e-5, grads='both', seed=1):
    """Triton and reference forward + backward on the same upstream gradients; returns both sides'
    {name: tensor}. grads: 'both', 'normed' or 'residual_out': which outputs receive a gradient."""
    sides = []
    for fn in (add_rms_norm_triton, add_rms_norm_ref):
        leaves = [x.clone().requires_grad_() if x is not None else None for x in (hidden, residual, weight)]
        normed, res_out = fn(*leaves, eps=eps, scale=scale, out_dtype=out_dtype)
        g = torch.Generator().manual_seed(seed)
        dn = torch.randn(normed.shape, generator=g).to(normed.dtype)
        dr = torch.randn(res_out.shape, generator=g)
        outs, ups = {'both': ((normed, res_out), (dn, dr)), 'normed': ((normed,), (dn,)),
                     'residual_out': ((res_out,), (dr,))}[grads]
        torch.autograd.backward(outs, ups)
        side = {'normed': normed, 'residual_out': res_out}
        side.update({'d' + n: x.grad for n, x in zip(('hidden', 'residual', 'weight'), leaves) if x is not None})
        sides.append(side)
    return sides


def assert_match(ours, ref):
    assert ours.keys() == ref.keys()
    for name in ref:
        got, want = ours[name], ref[name]
        if want is None and name == 'dweight':  # normed got no gradient: torch leaves weight.grad None
            assert got is None
            continue
        assert got is not None and want is not None, name
        assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous(), name
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, **(LOOSE if got.dtype == torch.bfloat16 else TIGHT),
                                   msg=lambda m, name=name: f'{name}: {m}')


CASES = {  # hidden dtype, residual given, scale given, out_dtype
    'fp32': (torch.float32, True, True, None),
    'fp32-noscale': (torch.float32, True, False, None),
    'first-block': (torch.float32, False, True, None),  # residual None: scale is ignored
    'bf16-hidden': (torch.bfloat16, True, True, None),
    'fp32-bf16out': (torch.float32, True, True, torch.bfloat16),
}


@pytest.mark.parametrize('case', sorted(CASES))
@pytest.mark.parametrize('batch', [1, 3])
@pytest.mark.parametrize('L', [1, 7, 130])
@pytest.mark.parametrize('C', [5, 24, 192])
def test_matches_reference(C, L, batch, case):
    dtype, residual, scale, out_dtype = CASES[case]
    hidden, res, weight, sc = make_inputs(batch, C, L, dtype, residual, scale)
    ours, ref = run_both(hidden, res, weight, sc, out_dtype)
    assert ours['normed'].dtype == (out_dtype or dtype) and ours['residual_out'].dtype == torch.float32
    assert_match(ours, ref)


@pytest.mark.parametrize('case', ['fp32', 'bf16-hidden', 'first-block'])
@pytest.mark.parametrize('C', [5, 24, 192])
def test_many_token_blocks(small_tiles, C, case):
    assert interface._launch(C, 130)[1] == 8
    dtype, residual, scale, out_dtype = CASES[case]
    assert_match(*run_both(*make_inputs(3, C, 130, dtype, residual, scale, seed=2), out_dtype))


@pytest.mark.parametrize('grads', ['normed', 'residual_out'])
@pytest.mark.parametrize('residual', [True, False])
def test_one_output_used(grads, residual):
    """The unused output's gradient reaches backward as None; with none for normed, d weight stays None."""
    ours, ref = run_both(*make_inputs(3, 24, 7, residual=residual), grads=grads)
    assert_match(ours, ref)
    assert (ours['dweight'] is None) == (grads == 'residual_out')


def test_dropped_sample_gets_no_hidden_gradient():
    ours, _ = run_both(*make_inputs(3, 24, 7))
    assert torch.equal(ours['dhidden'][0], torch.zeros(24, 7))
    assert ours['dhidden'][1:].abs().amax() > 0 and ours['dresidual'][0].abs().amax() > 0


def test_partial_requires_grad_and_non_contiguous():
    """Only hidden needs a gradient (weight and residual frozen); a hidden that is a transposed view."""
    _, res, weight, sc = make_inputs(2, 24, 7)
    base = torch.randn(2, 7, 24)
    sides = []
    for fn in (add_rms_norm_triton, add_rms_norm_ref):
        h = base.clone().requires_grad_()
        normed, res_out = fn(h.transpose(1, 2), res, weight, scale=sc)
        (normed * torch.linspace(-1, 1, 7)).sum().backward()
        sides.append((normed, res_out, h.grad))
    for got, want in zip(*sides):
        torch.testing.assert_close(got, want, **TIGHT)


def test_second_backward_and_eps():
    hidden, res, weight, sc = make_inputs(2, 24, 7)
    hidden = hidden * 1e-3  # eps matters at this size
    assert_match(*run_both(hidden, res * 1e-3, weight, sc, eps=1e-4))
    h = hidden.clone().requires_grad_()
    normed, _ = add_rms_norm_triton(h, res, weight, scale=sc)
    g1, = torch.autograd.grad(normed.sum(), h, retain_graph=True)
    g2, = torch.autograd.grad(normed.sum(), h)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize('residual', [True, False])
@pytest.mark.parametrize('scale', [True, False])
def test_reference_is_the_unfused_formula(residual, scale):
    hidden, res, weight, sc = make_inputs(3, 24, 7, torch.bfloat16, residual, scale)
    eps = 1e-5
    normed, res_out = add_rms_norm_ref(hidden, res, weight, eps, sc, torch.float32)
    x32 = hidden.float()
    if residual:
        x32 = res + (sc[:, None, None] if scale else 1.0) * x32
    assert torch.equal(res_out, x32)
    want = x32 * torch.rsqrt(x32.pow(2).mean(1, keepdim=True) + eps) * weight[:, None]
    assert torch.equal(normed, want)
    # and torch's own RMSNorm over the last axis of the channels-last view
    torch.testing.assert_close(normed, F.rms_norm(x32.transpose(1, 2), (24,), weight, eps).transpose(1, 2))
    assert add_rms_norm_ref(hidden, res, weight, eps, sc)[0].dtype == torch.bfloat16
    if not residual:  # a new tensor, never hidden itself
        assert res_out.data_ptr() != hidden.data_ptr()


def test_dispatch(monkeypatch):
    hidden, res, weight, sc = make_inputs(2, 5, 7)
    w = weight.clone().requires_grad_()
    monkeypatch.delenv('VIM_DISC_NORM', raising=False)
    assert 'AddRMSNorm' not in type(add_rms_norm(hidden, res, w, scale=sc)[0].grad_fn).__name__  # CPU: torch
    monkeypatch.setenv('VIM_DISC_NORM', 'triton')
    ours = add_rms_norm(hidden, res, w, scale=sc)
    assert 'AddRMSNorm' in type(ours[0].grad_fn).__name__
    monkeypatch.setenv('VIM_DISC_NORM', 'ref')
    ref = add_rms_norm(hidden, res, w, scale=sc)
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got, want, **TIGHT)
    monkeypatch.setenv('VIM_DISC_NORM', 'cuda')
    with pytest.raises(ValueError, match='VIM_DISC_NORM'):
        add_rms_norm(hidden, res, w)


BAD = {  # argument named in the error: (hidden, residual, weight, scale, out_dtype) edits
    'hidden': lambda h, r, w, s: (h[0], r, w, s, None),
    'hidden ': lambda h, r, w, s: (h.long(), r, w, s, None),
    'residual': lambda h, r, w, s: (h, r.bfloat16(), w, s, None),
    'residual ': lambda h, r, w, s: (h, r[:, :, :-1], w, s, None),
    'weight': lambda h, r, w, s: (h, r, w[:-1], s, None),
    'weight ': lambda h, r, w, s: (h, r, w[None], s, None),
    'scale': lambda h, r, w, s: (h, r, w, s[:1], None),
    'scale ': lambda h, r, w, s: (h, r, w, s > 0, None),
    'out_dtype': lambda h, r, w, s: (h, r, w, s, torch.int32),
}


@pytest.mark.parametrize('name', sorted(BAD))
@pytest.mark.parametrize('fn', [add_rms_norm, add_rms_norm_triton], ids=['dispatch', 'triton'])
def test_value_errors(fn, name):
    h, r, w, s, out_dtype = BAD[name](*make_inputs(2, 5, 7))
    with pytest.raises(ValueError, match=name.strip()):
        fn(h, r, w, scale=s, out_dtype=out_dtype)


CHILD = r'''
import triton
from triton.backends.compiler import GPUTarget
from kernels.rmsnorm.backward import add_rms_norm_bwd_kernel
from kernels.rmsnorm.forward import add_rms_norm_fwd_kernel
from kernels.rmsnorm.interface import _launch
from tools.scan_compile_report import resources

# Vim-T at 1024 px: C = 192 channels, L = 4096 tokens; fp32 residual stream, bf16 hidden and normed
BF16 = {'hidden_ptr', 'normed_ptr', 'dnormed_ptr', 'dhidden_ptr'}
block_c, block_l, num_warps = _launch(192, 4096)
fwd = [dict(HAS_RESIDUAL=True, HAS_SCALE=True), dict(HAS_RESIDUAL=False, HAS_SCALE=False)]
bwd = [dict(HAS_DNORMED=True, HAS_DRES_OUT=True, HAS_SCALE=True, STORE_DHIDDEN=True, STORE_DRESIDUAL=True,
            STORE_DWEIGHT=True),
       dict(HAS_DNORMED=True, HAS_DRES_OUT=False, HAS_SCALE=False, STORE_DHIDDEN=True, STORE_DRESIDUAL=False,
            STORE_DWEIGHT=False)]
for kernel, variants in ((add_rms_norm_fwd_kernel, fwd), (add_rms_norm_bwd_kernel, bwd)):
    for flags in variants:
        consts = dict(flags, BLOCK_C=block_c, BLOCK_L=block_l)
        sig = {n: 'constexpr' if n in consts else 'fp32' if n == 'eps' else 'i32' if not n.endswith('_ptr')
               else '*bf16' if n in BF16 else '*fp32' for n in kernel.arg_names}
        attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(kernel.arg_names)
                 if sig[n] not in ('constexpr', 'fp32')}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': num_warps})
        print('compiled', kernel.fn.__name__, *resources(k), flush=True)
'''


@needs_ptxas
def test_kernels_compile_for_sm90():
    """Both kernels through Triton's CUDA backend and ptxas for sm_90a (the interpreter misses what only the
    compiler rejects), at the shipped launch shape for C = 192, L = 4096: no register spills."""
    lines, stdout = compiled_lines(CHILD)
    assert len(lines) == 4, stdout
    for _, name, regs, spill_st, spill_ld in lines:
        assert 0 < int(regs) <= 255 and spill_st == spill_ld == '0', stdout
