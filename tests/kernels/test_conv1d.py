"""The fused bidirectional depthwise conv1d + SiLU (kernels/conv1d) in Triton's CPU interpreter.

Triton vs the torch reference (outputs and dx, dweight, dbias under one random upstream gradient) on odd shapes,
x as a channel slice of a (batch, 2 * dim, L) tensor and contiguous, both direction counts, with and without bias,
and launch shapes small enough that every tile boundary, channel-block edge and the backward's multi-tile
programs are crossed; every allocation the kernels write is poisoned with NaN first, so an element a kernel skips
fails the comparison. Also: the reference's direction-1 convention against an explicitly flipped sequence, the
ValueErrors, the dispatch, autocast, and an sm_90a compile of both kernels in a child process (the interpreter
misses GPU-only errors).
"""
import math
import pytest
import torch
import torch.nn.functional as F

from kernels.conv1d import (ConvConfig, depthwise_conv1d_silu, depthwise_conv1d_silu_ref,
                            depthwise_conv1d_silu_triton)
from kernels.conv1d import interface
from tests.kernels.compile_child import compiled_lines, needs_ptxas

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# small tiles: at dim 33 / L 130 three channel blocks (the last of one channel) and 3 (forward) or 5 (backward)
# time tiles; the backward's two program columns walk 3 tiles each, the last one wholly past L
SMALL = ConvConfig(block_d=16, block_l=64, num_warps=1, block_d_bwd=16, block_l_bwd=32, num_warps_bwd=1,
                   l_programs=2)


@pytest.fixture
def nan_empty(monkeypatch):
    """While a test runs torch.empty returns NaN-filled float tensors: the kernels' outputs and partials."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, 'empty', poisoned)


def make(batch, dim, L, K, R, dtype=torch.float32, bias=True, seed=0):
    """xz (batch, 2 * dim, L) (x is its first half, as in Vim's in_proj output), weight, bias."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, 2 * dim, L, generator=g).to(dtype)
    w = torch.randn(R, dim, K, generator=g) * K ** -0.5
    b = torch.randn(R, dim, generator=g) if bias else None
    return xz, w, b


def run(fn, xz, w, b, dout, strided, **kw):
    """fn on x = xz[:, :dim] (strided, or a contiguous copy); returns out and the grads of (xz, w, b)."""
    dim = w.shape[1]
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (xz, w, b)]
    x = leaves[0][:, :dim] if strided else leaves[0][:, :dim].contiguous()
    out = fn(x, leaves[1], leaves[2], **kw)
    out.backward(dout if dout is not None else torch.ones_like(out))
    return out, [t.grad if t is not None else None for t in leaves]


def compare(xz, w, b, strided=True, config=SMALL, activation='silu'):
    """Triton vs the reference on the same inputs and upstream gradient: out and every gradient."""
    batch, dim, L = xz.shape[0], w.shape[1], xz.shape[2]
    dout = torch.randn(batch, w.shape[0], dim, L).to(xz.dtype)
    out_ref, grads_ref = run(depthwise_conv1d_silu_ref, xz, w, b, dout, strided, activation=activation)
    out, grads = run(depthwise_conv1d_silu_triton, xz, w, b, dout, strided, activation=activation, config=config)
    assert out.shape == (batch, w.shape[0], dim, L) and out.dtype == xz.dtype and out.is_contiguous()
    rtol, atol = TOL[xz.dtype]
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol, msg=lambda m: f'out: {m}')
    assert torch.count_nonzero(grads[0][:, dim:]) == 0  # z's half gets no gradient
    for name, got, want, t in zip(['dx', 'dweight', 'dbias'], grads, grads_ref, (xz, w, b)):
        if t is None:
            continue
        assert got.dtype == t.dtype, name
        tol = (rtol, atol) if name == 'dx' else (1e-5, 1e-5)  # fp32 sums of the same fp32 products
        torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1], msg=lambda m, n=name: f'{n}: {m}')


# (batch, dim, L, K, R, bias, strided): every listed size of each axis appears, mixed across cases
CASES = [
    (1, 5, 1, 4, 2, True, True),
    (3, 5, 3, 2, 2, False, False),
    (1, 33, 37, 3, 2, True, True),
    (3, 5, 37, 4, 1, True, False),
    (1, 5, 130, 4, 2, False, True),
    (3, 33, 130, 2, 1, True, True),
    (1, 33, 3, 3, 1, False, True),
    (3, 5, 130, 3, 2, True, False),
]


@pytest.mark.parametrize('batch,dim,L,K,R,bias,strided', CASES)
def test_fp32_matches_reference(nan_empty, batch, dim, L, K, R, bias, strided):
    compare(*make(batch, dim, L, K, R, bias=bias), strided=strided)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_half_precision_matches_reference(nan_empty, dtype):
    """bf16/fp16 x, fp32 parameters: the same fp32 math, out/dx rounded once to x's dtype."""
    compare(*make(2, 5, 37, 4, 2, dtype=dtype))


def test_default_launch_and_no_activation(nan_empty):
    compare(*make(2, 5, 130, 4, 2), config=None)
    compare(*make(1, 5, 37, 3, 2), activation=None)


def test_long_kernel(nan_empty):
    """K up to 8 (the most the kernels unroll), and K = 1."""
    compare(*make(1, 5, 37, 8, 2))
    compare(*make(1, 5, 37, 1, 2))


@pytest.mark.parametrize('batch,L,K,R,bias,strided', [(2, 37, 4, 2, True, True), (1, 20, 8, 1, False, False)])
def test_tiles_shorter_than_kernel(nan_empty, batch, L, K, R, bias, strided):
    """Tiles of 8 (forward) and 4 (backward) steps, so a tap reaches one or two tiles away; channel blocks of 2;
    three backward program columns, the last one's last tile(s) wholly past L."""
    tiny = ConvConfig(block_d=2, block_l=8, num_warps=1, block_d_bwd=2, block_l_bwd=4, num_warps_bwd=1, l_programs=3)
    compare(*make(batch, 5, L, K, R, bias=bias), strided=strided, config=tiny)


def test_reference_direction_conventions():
    """Direction 1 is the causal conv of the time-flipped sequence read back in original order; both equal
    the brief's sums written out as loops."""
    xz, w, b = make(2, 5, 11, 4, 2)
    x = xz[:, :5]
    K, L = 4, 11
    out = depthwise_conv1d_silu_ref(x, w, b, activation=None)
    flipped = F.conv1d(x.flip(-1), w[1, :, None], b[1], padding=K - 1, groups=5)[..., :L].flip(-1)
    torch.testing.assert_close(out[:, 1], flipped, rtol=1e-6, atol=1e-6)
    xp = F.pad(x, (K - 1, K - 1))  # xp[..., t + K - 1] = x[..., t], zero outside
    y0 = b[0, :, None] + sum(w[0, :, k, None] * xp[..., k:k + L] for k in range(K))  # x[t - K + 1 + k]
    y1 = b[1, :, None] + sum(w[1, :, K - 1 - k, None] * xp[..., K - 1 + k:K - 1 + k + L] for k in range(K))  # x[t+k]
    torch.testing.assert_close(out[:, 0], y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[:, 1], y1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(depthwise_conv1d_silu_ref(x, w, b), F.silu(out), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(depthwise_conv1d_silu_ref(x, w[:1], b[:1]), F.silu(out[:, :1]), rtol=0, atol=0)


@pytest.mark.parametrize('fn', [depthwise_conv1d_silu, depthwise_conv1d_silu_triton, depthwise_conv1d_silu_ref])
def test_bad_shapes_raise(fn):
    x, w, b = torch.randn(2, 6, 9), torch.randn(2, 6, 4), torch.randn(2, 6)
    bad = [
        (dict(x=torch.randn(6, 9)), 'x'),
        (dict(weight=torch.randn(6, 4)), 'weight'),
        (dict(weight=torch.randn(3, 6, 4)), 'weight'),
        (dict(weight=torch.randn(2, 5, 4)), 'weight'),
        (dict(bias=torch.randn(6)), 'bias'),
        (dict(bias=torch.randn(1, 6)), 'bias'),
        (dict(activation='relu'), 'activation'),
        (dict(x=torch.randn(2, 6, 9).to(torch.int32)), 'x'),
    ]
    for change, name in bad:
        args = dict(x=x, weight=w, bias=b, activation='silu', **{})
        args.update(change)
        with pytest.raises(ValueError, match=name):
            fn(**args)
    with pytest.raises(ValueError, match='weight'):
        depthwise_conv1d_silu_triton(x, torch.randn(2, 6, 9), b)  # more taps than the kernels unroll


def test_dispatch_follows_env(monkeypatch):
    """CPU tensors run the reference unless VIM_DISC_CONV=triton; an unknown mode is an error."""
    calls = []
    monkeypatch.setattr(interface, 'depthwise_conv1d_silu_triton', lambda *a, **k: calls.append(1) or 'triton')
    x, w, b = torch.randn(1, 3, 5), torch.randn(2, 3, 4), torch.randn(2, 3)
    monkeypatch.delenv('VIM_DISC_CONV', raising=False)
    torch.testing.assert_close(depthwise_conv1d_silu(x, w, b), depthwise_conv1d_silu_ref(x, w, b))
    monkeypatch.setenv('VIM_DISC_CONV', 'ref')
    torch.testing.assert_close(depthwise_conv1d_silu(x, w, b), depthwise_conv1d_silu_ref(x, w, b))
    assert not calls
    monkeypatch.setenv('VIM_DISC_CONV', 'triton')
    assert depthwise_conv1d_silu(x, w, b) == 'triton' and calls == [1]
    monkeypatch.setenv('VIM_DISC_CONV', 'cuda')
    with pytest.raises(ValueError, match='VIM_DISC_CONV'):
        depthwise_conv1d_silu(x, w, b)


def test_autocast_keeps_dtypes(nan_empty):
    """Under autocast x arrives bf16 with fp32 parameters: out and dx bf16, dweight/dbias fp32, as the reference."""
    xz, w, b = make(2, 5, 37, 4, 2, dtype=torch.bfloat16)
    dout = torch.randn(2, 2, 5, 37).to(torch.bfloat16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, grads = run(depthwise_conv1d_silu_triton, xz, w, b, dout, True, config=SMALL)
        out_ref, grads_ref = run(depthwise_conv1d_silu_ref, xz, w, b, dout, True)
    assert out.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(out, out_ref, rtol=1.6e-2, atol=1.6e-2)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1.6e-2)


CHILD = r'''
import triton
from triton.backends.compiler import GPUTarget
from kernels.conv1d.backward import conv1d_silu_bwd_kernel
from kernels.conv1d.forward import conv1d_silu_fwd_kernel
from kernels.conv1d.interface import ConvConfig, bwd_launch, fwd_launch
from tools.scan_compile_report import resources

FP32 = {'w_ptr', 'b_ptr', 'part_ptr'}


def compile_kernel(kernel, consts, num_warps, dtype):
    """sm_90a, every pointer and stride 16-aligned as the JIT specialises them at dim 384, L 4096."""
    sig = {n: 'constexpr' if n in consts else ('*fp32' if n in FP32 else f'*{dtype}') if n.endswith('_ptr')
           else 'i32' for n in kernel.arg_names}
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n] != 'constexpr' and n != 'tiles_per_prog'}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': num_warps})


for K, R, dtype in ((4, 2, 'bf16'), (4, 1, 'bf16'), (3, 2, 'fp32')):
    flags = dict(K=K, R=R, HAS_BIAS=True, SILU=True)
    bd, bl, nw = fwd_launch(384, 4096, ConvConfig())
    k = compile_kernel(conv1d_silu_fwd_kernel, dict(flags, BLOCK_D=bd, BLOCK_L=bl), nw, dtype)
    print('compiled fwd', K, R, dtype, *resources(k), flush=True)
    bd, bl, nw = bwd_launch(384, 4096, ConvConfig())
    k = compile_kernel(conv1d_silu_bwd_kernel, dict(flags, BLOCK_D=bd, BLOCK_L=bl, KB=triton.next_power_of_2(K + 1)),
                       nw, dtype)
    print('compiled bwd', K, R, dtype, *resources(k), flush=True)
'''


@needs_ptxas
def test_kernels_compile_for_sm90():
    """Both kernels at the shipped launch shapes (dim 384, L 4096): they compile, fit the register file and
    do not spill."""
    lines, stdout = compiled_lines(CHILD)
    assert len(lines) == 6, stdout
    for line in lines:
        regs, spill_st, spill_ld = map(int, line[-3:])
        assert 0 < regs <= 255 and spill_st == spill_ld == 0, line
