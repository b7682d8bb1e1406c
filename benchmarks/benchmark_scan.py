"""Benchmark the fused Triton selective scan per discretization rule (a script: it prints and saves).

Providers per rule and shape, bf16 inputs, forward and forward+backward, medians of
``triton.testing.do_bench`` (quantiles 0.5 / 0.2 / 0.8):
  triton    the fused kernels (kernels/scan/: one launch forward, one backward)
  mamba     mamba-ssm's CUDA ``selective_scan`` (zoh only), JIT-built from its sdist for this GPU
  parallel  the log-depth PyTorch scan (kernels/parallel.py, the CPU training path) on the GPU
  ref       the sequential PyTorch reference (only at --ref-shapes: it launches kernels per step)
plus achieved GB/s over the fewest bytes the op must move, the peak memory a forward+backward adds
beyond its inputs, upstream gradient and returned gradients' inputs (torch.cuda.max_memory_allocated), and
the kernel launches of one forward and one backward (torch.profiler).

    python benchmarks/benchmark_scan.py --out scan.json --mamba-src .whl_src/mamba_ssm-2.3.2.post1.tar.gz
    python benchmarks/benchmark_scan.py --sweep --deadline 200   # launch shapes, to pick the defaults
"""
import argparse
import json
import math
import os
import re
import sys
import tarfile
import time

from _bootstrap import setup_repo_path

setup_repo_path()

import torch  # noqa: E402

SHAPES = {  # (batch, dim, L, N)
    'det-b2': (2, 384, 4096, 16),     # Vim-S at 1024 px, patch 16: the detection training shape
    'det-b8': (8, 384, 4096, 16),
    'cls-b128': (128, 384, 197, 16),  # ImageNet classification, 196 patches + cls token
}
MAMBA_NVCC_FLAGS = [
    '-O3', '-std=c++17', '-U__CUDA_NO_HALF_OPERATORS__', '-U__CUDA_NO_HALF_CONVERSIONS__',
    '-U__CUDA_NO_BFLOAT16_OPERATORS__', '-U__CUDA_NO_BFLOAT16_CONVERSIONS__',
    '-U__CUDA_NO_BFLOAT162_OPERATORS__', '-U__CUDA_NO_BFLOAT162_CONVERSIONS__',
    '--expt-relaxed-constexpr', '--expt-extended-lambda', '--use_fast_math', '-lineinfo',
    '--threads', '4', '-gencode', 'arch=compute_90,code=sm_90',
]


# ----------------------------------------------------------------------------------------------------
# mamba-ssm's CUDA scan, built from the sdist's csrc/selective_scan only
# ----------------------------------------------------------------------------------------------------
def load_mamba_scan(src, build_dir, verbose=False):
    """The compiled `selective_scan_cuda` module, or None (with the reason printed) when it cannot be had.

    src: the mamba-ssm sdist (.tar.gz) or its unpacked folder. A second call with the same build_dir
    reuses the build (ninja sees nothing to do).
    """
    try:
        import selective_scan_cuda  # noqa: F401  (an installed mamba-ssm with its CUDA build)
        return selective_scan_cuda
    except ImportError:
        pass
    if not src or not torch.cuda.is_available():
        print('mamba-ssm CUDA scan: no source given or no GPU; skipped')
        return None
    from torch.utils.cpp_extension import load
    os.makedirs(build_dir, exist_ok=True)
    if src.endswith('.tar.gz'):
        with tarfile.open(src) as tar:
            tar.extractall(build_dir, filter='data')
        src = os.path.join(build_dir, os.path.basename(src)[:-len('.tar.gz')])
    csrc = _real_only(os.path.join(src, 'csrc', 'selective_scan'))
    sources = [os.path.join(csrc, f) for f in sorted(os.listdir(csrc)) if f.endswith(('.cpp', '.cu'))]
    t0 = time.time()
    try:
        module = load(name='selective_scan_cuda', sources=sources, extra_cflags=['-O3', '-std=c++17'],
                      extra_cuda_cflags=MAMBA_NVCC_FLAGS, extra_include_paths=[csrc],
                      build_directory=build_dir, verbose=verbose)
    except Exception as exc:  # a failed build is reported, not fatal: the Triton numbers still stand
        print(f'mamba-ssm CUDA scan: build failed: {exc!r}')
        return None
    print(f'mamba-ssm CUDA scan ready in {time.time() - t0:.0f} s')
    return module


def _real_only(csrc):
    """Drop mamba's complex-weight backward (a third of the build; nothing here uses complex A): its three
    *_complex.cu files, and the dispatch branch that would reference them."""
    real = csrc + '_real'
    if not os.path.isdir(real):
        os.makedirs(real)
        for f in os.listdir(csrc):
            if f.endswith('_complex.cu'):
                continue
            text = open(os.path.join(csrc, f)).read()
            if f == 'selective_scan.cpp':
                text = re.sub(r'using weight_t = c10::complex<float>;\s*\\\s*__VA_ARGS__\(\);',
                              'AT_ERROR("complex weights were left out of this build");', text)
            with open(os.path.join(real, f), 'w') as out:
                out.write(text)
    return real


class MambaCudaScanFn(torch.autograd.Function):
    """mamba-ssm's SelectiveScanFn over a given `selective_scan_cuda` module (same calls, no package)."""

    @staticmethod
    def forward(ctx, module, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        squeeze = B.dim() == 3
        if squeeze:
            B, C = B.unsqueeze(1), C.unsqueeze(1)
        out, x, *rest = module.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        ctx.module, ctx.squeeze, ctx.delta_softplus, ctx.has_z = module, squeeze, delta_softplus, z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, x, out)
        return rest[0] if z is not None else out

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, B, C, D, z, delta_bias, x, out = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = ctx.module.bwd(
            u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), x, out if ctx.has_z else None, None,
            ctx.delta_softplus, False)
        if ctx.squeeze:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        dz = rest[0] if ctx.has_z else None
        return (None, du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                ddelta_bias if delta_bias is not None else None, None)


def mamba_scan(module):
    def fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        return MambaCudaScanFn.apply(module, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return fn


# ----------------------------------------------------------------------------------------------------
# Inputs, bytes, timing
# ----------------------------------------------------------------------------------------------------
def make_inputs(batch, dim, L, N, dtype=torch.bfloat16, device='cuda', seed=0):
    """Vim-like: A = -(1..N) per channel, dt bias = softplus^-1 of steps in [1e-3, 1e-1], gate z."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=g)
    u = torch.randn(batch, dim, L, dtype=dtype, **kw)
    delta = (0.5 * torch.randn(batch, dim, L, **kw)).to(dtype)
    A = -torch.arange(1, N + 1, device=device, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(batch, N, L, dtype=dtype, **kw)
    C = torch.randn(batch, N, L, dtype=dtype, **kw)
    D = torch.ones(dim, device=device)
    z = torch.randn(batch, dim, L, dtype=dtype, **kw)
    dt = torch.exp(torch.rand(dim, **kw) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    delta_bias = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    return [u, delta, A, B, C, D, z, delta_bias]


def min_bytes(batch, dim, L, N, itemsize, backward):
    """Each input read once, each output written once: u, delta, z, out (+ du, ddelta, dz, dout) per
    (batch, dim, L); B, C (+ dB, dC) per (batch, N, L)."""
    per_token = (4 if not backward else 4 + 4 + 4) * batch * dim * L * itemsize
    per_state = (2 if not backward else 2 + 2 + 2) * batch * N * L * itemsize
    return per_token + per_state


def time_ms(fn, leaves):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=150, grad_to_none=leaves, quantiles=[0.5, 0.2, 0.8])


def peak_extra_mib(step, leaves):
    """Peak memory one step adds above what exists before it (inputs, dout), returned grads included."""
    for x in leaves:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in leaves:
        x.grad = None
    return peak / 2 ** 20


def launches(scan, inputs, rule):
    """Kernel launches of one forward and of one backward (torch.profiler, after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    kw = {'discretization': rule} if rule else {}
    scan(*leaves, delta_softplus=True, **kw).backward(torch.ones_like(inputs[0]))
    counts, names = [], []
    out = None
    dout = torch.ones_like(inputs[0])
    for x in leaves:  # else AccumulateGrad's adds into existing .grad would be counted as the op's launches
        x.grad = None
    for phase in ('fwd', 'bwd'):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            if phase == 'fwd':
                out = scan(*leaves, delta_softplus=True, **kw)
            else:
                out.backward(dout)
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        counts.append(len(kernels))
        names.append(kernels)
    return counts, names


def measure(scan, inputs, rule, shape, with_memory=True, fwd_only=False):
    """{fwd, fwd_bwd: (median, p20, p80) ms, mem_mib} for scan(u, delta, A, B, C, D, z, bias, softplus[, rule])."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    dout = torch.randn_like(inputs[0])

    def fwd():
        return scan(*leaves, delta_softplus=True, **({'discretization': rule} if rule else {}))

    def fwd_bwd():
        fwd().backward(dout)

    res = {'fwd': time_ms(fwd, leaves)}
    if not fwd_only:
        res['fwd_bwd'] = time_ms(fwd_bwd, leaves)
    if with_memory:
        res['mem_mib'] = peak_extra_mib(fwd_bwd, leaves)
    return res


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------
def run_table(args, providers):
    from kernels.discretization import RULES
    from kernels.naive import selective_scan_ref
    from kernels.parallel import selective_scan_parallel
    from kernels.scan import selective_scan_triton
    rules = args.rules or list(RULES)
    rows = []
    for shape_name in args.shapes:
        batch, dim, L, N = SHAPES[shape_name]
        inputs = make_inputs(batch, dim, L, N)
        itemsize = inputs[0].element_size()
        bytes_f = min_bytes(batch, dim, L, N, itemsize, False)
        bytes_fb = min_bytes(batch, dim, L, N, itemsize, True)
        candidates = [('triton', selective_scan_triton, rule) for rule in rules]
        if 'mamba' in providers:
            candidates.insert(0, ('mamba', providers['mamba'], None))
        if args.parallel:
            candidates += [('parallel', selective_scan_parallel, rule) for rule in ('zoh', 'highorder')]
        if shape_name in args.ref_shapes:
            candidates += [('ref', selective_scan_ref, rule) for rule in ('zoh', 'highorder')]
        for provider, scan, rule in candidates:
            try:
                res = measure(scan, inputs, rule, shape_name)
                (n_fwd, n_bwd), names = launches(scan, inputs, rule) if provider != 'ref' else ((None, None), None)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                print(f'{shape_name} {provider} {rule}: out of memory')
                continue
            row = dict(shape=shape_name, batch=batch, dim=dim, L=L, N=N, provider=provider, rule=rule or 'zoh',
                       fwd_ms=res['fwd'], fwd_bwd_ms=res['fwd_bwd'], mem_mib=res['mem_mib'],
                       fwd_gbs=bytes_f / res['fwd'][0] / 1e6, fwd_bwd_gbs=bytes_fb / res['fwd_bwd'][0] / 1e6,
                       launches_fwd=n_fwd, launches_bwd=n_bwd, launch_names=names)
            rows.append(row)
            print(f"{shape_name:9s} {provider:9s} {row['rule']:9s} fwd {res['fwd'][0]:8.3f} ms "
                  f"fwd+bwd {res['fwd_bwd'][0]:8.3f} ms  mem {res['mem_mib']:7.1f} MiB  launches {n_fwd}/{n_bwd}",
                  flush=True)
    return rows


def print_table(rows):
    print(f"\n{'shape':9s} {'provider':9s} {'rule':9s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} {'GB/s f':>7s} "
          f"{'GB/s fb':>7s} {'mem MiB':>8s} {'launch':>6s} {'vs mamba':>8s} {'vs zoh':>7s}")
    for row in rows:
        base = [r for r in rows if r['shape'] == row['shape'] and r['provider'] == 'mamba']
        zoh = [r for r in rows if r['shape'] == row['shape'] and r['provider'] == row['provider']
               and r['rule'] == 'zoh']
        vs_mamba = base[0]['fwd_bwd_ms'][0] / row['fwd_bwd_ms'][0] if base else float('nan')
        vs_zoh = row['fwd_bwd_ms'][0] / zoh[0]['fwd_bwd_ms'][0] if zoh else float('nan')
        n = f"{row.get('launches_fwd')}/{row.get('launches_bwd')}"
        print(f"{row['shape']:9s} {row['provider']:9s} {row['rule']:9s} {row['fwd_ms'][0]:8.3f} "
              f"{row['fwd_bwd_ms'][0]:10.3f} {row['fwd_gbs']:7.0f} {row['fwd_bwd_gbs']:7.0f} {row['mem_mib']:8.1f} "
              f"{n:>6s} {vs_mamba:7.2f}x {vs_zoh:6.2f}x")


# (tile_l, block_d, num_warps, states per trip) candidates: forward ones timed forward-only, backward ones
# forward+backward (the forward then takes its defaults for that tile_l)
SWEEP_FWD = [(512, 1, 2, 2), (512, 1, 2, 1), (256, 1, 1, 1), (256, 1, 1, 2), (1024, 1, 4, 2), (512, 2, 4, 2)]
SWEEP_BWD = [(512, 1, 4, 1), (512, 1, 2, 1), (256, 1, 1, 1), (512, 1, 4, 2), (256, 1, 2, 1), (512, 2, 4, 1)]


def run_sweep(args):
    """Launch shapes by hand (the backward accumulates in place, so no autotuner), until --deadline."""
    from kernels.scan import ScanConfig, selective_scan_triton
    start = time.time()
    rows = []
    for shape_name in args.shapes:
        inputs = make_inputs(*SHAPES[shape_name])
        for rule in args.rules or ['zoh', 'highorder']:
            jobs = [('fwd', *c) for c in SWEEP_FWD] + [('bwd', *c) for c in SWEEP_BWD]
            for phase, tile, bd, nw, st in jobs:
                if args.deadline and time.time() - start > args.deadline:
                    print('sweep: deadline reached')
                    return rows
                cfg = (ScanConfig(tile_l=tile, block_d=bd, num_warps=nw, states=st) if phase == 'fwd' else
                       ScanConfig(tile_l=tile, block_d_bwd=bd, num_warps_bwd=nw, states_bwd=st))

                def scan(*a, cfg=cfg, **k):
                    return selective_scan_triton(*a, config=cfg, **k)
                try:
                    res = measure(scan, inputs, rule, shape_name, with_memory=False, fwd_only=phase == 'fwd')
                except Exception as exc:  # a launch shape that does not compile is a data point too
                    print(f'{shape_name} {rule} {phase} {tile}/{bd}/{nw}/{st}: failed {exc!r}'[:300])
                    continue
                total = res.get('fwd_bwd', res['fwd'])[0]
                rows.append(dict(shape=shape_name, rule=rule, phase=phase, tile_l=tile, block_d=bd, num_warps=nw,
                                 states=st, fwd_ms=res['fwd'], fwd_bwd_ms=res.get('fwd_bwd')))
                print(f"sweep {shape_name:9s} {rule:9s} {phase} tile {tile:4d} block_d {bd} warps {nw:2d} states {st}: "
                      f"fwd {res['fwd'][0]:7.3f} {'fwd+bwd' if phase == 'bwd' else ''} "
                      f"{total if phase == 'bwd' else '':}", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rules', nargs='*', default=None, help='default: all six')
    parser.add_argument('--shapes', nargs='*', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--ref-shapes', nargs='*', default=['cls-b128'], help='shapes that also time the reference')
    parser.add_argument('--parallel', action='store_true', help='also time the PyTorch parallel scan')
    parser.add_argument('--mamba-src', default=None, help='mamba-ssm sdist (.tar.gz) or unpacked folder')
    parser.add_argument('--mamba-build-dir', default='/tmp/mamba_scan_build')
    parser.add_argument('--build-only', action='store_true', help='build mamba-ssm\'s scan and exit')
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--deadline', type=float, default=0, help='seconds after which the sweep stops')
    parser.add_argument('--no-mamba', action='store_true', help='skip mamba-ssm even if built')
    parser.add_argument('--out', default=None, help='JSON file for every number printed')
    args = parser.parse_args()

    providers = {}
    module = None if args.no_mamba else load_mamba_scan(args.mamba_src, args.mamba_build_dir)
    if args.build_only:
        sys.exit(0 if module is not None else 1)
    if module is not None:
        providers['mamba'] = mamba_scan(module)
    card = torch.cuda.get_device_name()
    print(f'card: {card}; torch {torch.__version__}; triton {__import__("triton").__version__}')
    result = dict(card=card, torch=torch.__version__, command=' '.join(sys.argv))
    if args.sweep:
        result['sweep'] = run_sweep(args)
    else:
        result['rows'] = run_table(args, providers)
        print_table(result['rows'])
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
