"""The fused bidirectional depthwise conv1d + SiLU on CUDA: against the float64 torch reference at Vim's shape
(batch 2, dim 384, L 4096, K 4) in fp32 and bf16 and on odd shapes, every gradient; under autocast; and captured
(forward + backward) in a CUDA graph, replayed on new data, equal to eager.

Runs on the GPU machine (skipped without CUDA).
"""
import pytest
import torch

from kernels.conv1d import ConvConfig, depthwise_conv1d_silu, depthwise_conv1d_silu_ref, depthwise_conv1d_silu_triton

pytestmark = pytest.mark.gpu

# out / dx in x's dtype: fp32 within fp32 rounding of the float64 sums; half precision within one rounding of the
# output (the kernel and the reference see the same rounded inputs); dweight/dbias are fp32 sums over batch * L
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
SMALL = ConvConfig(block_d=2, block_l=32, num_warps=1, block_d_bwd=4, block_l_bwd=16, num_warps_bwd=1, l_programs=3)


def make(batch, dim, L, K, R, dtype, bias=True, strided=True, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    xz = torch.randn(batch, 2 * dim, L, device='cuda', generator=g).to(dtype)
    x = xz[:, :dim] if strided else xz[:, :dim].contiguous()
    w = torch.randn(R, dim, K, device='cuda', generator=g) * K ** -0.5
    b = torch.randn(R, dim, device='cuda', generator=g) if bias else None
    return x, w, b


def compare(x, w, b, config=None, activation='silu'):
    """Triton vs the float64 reference on the same (rounded) inputs and upstream gradient; every gradient."""
    ours = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = depthwise_conv1d_silu_triton(*ours, activation=activation, config=config)
    out_ref = depthwise_conv1d_silu_ref(*ref, activation=activation)
    assert out.dtype == x.dtype and out.is_contiguous() and out.shape == out_ref.shape
    dout = torch.randn_like(out_ref).to(x.dtype)
    out.backward(dout)
    out_ref.backward(dout.double())
    rtol, atol = TOL[x.dtype]
    checks = [('out', out, out_ref, rtol, atol)]
    names = ['dx', 'dweight', 'dbias']
    for name, t, r in zip(names, ours, ref):
        if t is None:
            continue
        assert t.grad.dtype == t.dtype, name
        # a parameter's gradient sums batch * L products: scale the absolute slack with the size of the sum
        scale = 1.0 if name == 'dx' else (x.shape[0] * x.shape[2]) ** 0.5
        checks.append((name, t.grad, r.grad, rtol if name == 'dx' else 1e-5, atol * scale))
    for name, got, want, rt, at in checks:
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=rt, atol=at, msg=lambda m, n=name: f'{n}: {m}')


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('R', [2, 1])
def test_vim_shape(dtype, R):
    compare(*make(2, 384, 4096, 4, R, dtype))


@pytest.mark.parametrize('batch,dim,L,K,R,bias,strided,dtype', [
    (3, 33, 130, 3, 1, False, True, torch.float32),
    (1, 5, 1, 2, 2, True, False, torch.float32),
    (2, 37, 701, 4, 2, True, False, torch.float16),
    (8, 384, 1000, 4, 2, True, True, torch.bfloat16),
    (2, 20, 300, 8, 2, False, True, torch.float32),
    (2, 24, 257, 1, 2, True, True, torch.float32),
])
@pytest.mark.parametrize('small', [False, True], ids=['default', 'small-tiles'])
def test_odd_shapes(batch, dim, L, K, R, bias, strided, dtype, small):
    compare(*make(batch, dim, L, K, R, dtype, bias, strided), config=SMALL if small else None)


def test_no_activation():
    compare(*make(2, 48, 333, 4, 2, torch.float32), activation=None)


def test_autocast_bf16_input_fp32_weights():
    """Under autocast x arrives bf16, the parameters stay fp32: out/dx bf16, dweight/dbias fp32."""
    x, w, b = make(2, 64, 513, 4, 2, torch.bfloat16)
    w.requires_grad_(), b.requires_grad_()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        out = depthwise_conv1d_silu(x, w, b)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    w_ref, b_ref = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    out_ref = depthwise_conv1d_silu_ref(x.double(), w_ref, b_ref)
    torch.testing.assert_close(out.double(), out_ref, rtol=1.6e-2, atol=1.6e-2)
    out_ref.to(torch.bfloat16).double().square().sum().backward()  # the same rounding of out before the loss
    torch.testing.assert_close(w.grad.double(), w_ref.grad, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(b.grad.double(), b_ref.grad, rtol=1e-3, atol=1e-2)


def test_cuda_graph_capture_fwd_bwd():
    """fwd + bwd captured once, replayed on new data: the same out and gradients as an eager run."""
    batch, dim, L, K = 2, 384, 4096, 4
    xz = torch.randn(batch, 2 * dim, L, device='cuda', dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(2, dim, K, device='cuda', requires_grad=True)
    b = torch.randn(2, dim, device='cuda', requires_grad=True)
    dout = torch.randn(batch, 2, dim, L, device='cuda', dtype=torch.bfloat16)

    def step():
        out = depthwise_conv1d_silu(xz[:, :dim], w, b)
        out.backward(dout)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels and warm the allocator outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (xz, w, b):
        t.grad = None  # allocated inside the graph's pool, rewritten by each replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step()

    with torch.no_grad():
        for t in (xz, w, b, dout):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    got = [out_static.clone()] + [t.grad.clone() for t in (xz, w, b)]

    leaves = [t.detach().clone().requires_grad_() for t in (xz, w, b)]
    out = depthwise_conv1d_silu(leaves[0][:, :dim], leaves[1], leaves[2])
    out.backward(dout)
    want = [out] + [t.grad for t in leaves]
    for name, g, e in zip(['out', 'dxz', 'dweight', 'dbias'], got, want):
        assert torch.equal(g, e), name  # same kernels, same launch shapes, fixed-order sums: bitwise
    assert torch.count_nonzero(got[1][:, dim:]) == 0  # z's half of xz gets no gradient from the conv


def test_backward_is_deterministic():
    x, w, b = make(8, 384, 1000, 4, 2, torch.bfloat16)
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        depthwise_conv1d_silu(*leaves).float().sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, c in zip(['dx', 'dweight', 'dbias'], *grads):
        assert torch.equal(a, c), name
